"""The Ray Data pipeline of training batches: `build_dataset(cfg)` -> a `ray.data.Dataset`
whose rows are whole batches (`batches.to_row`), made by `batches.decode_group` in Ray tasks
from a tar datasource that reads members by `tars`' rules. Pass it to
`TorchTrainer(datasets=...)` and read `stream.BatchStream(get_dataset_shard(name))` in the
worker; for the same seed and epoch it gives the batches `stream.iter_batches` gives.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from pipelines.data.batches import (
    DataConfig,
    blocks_of,
    decode_group,
    readable_shards,
    shard_counts,
    shuffle_seed,
    to_row,
)
from pipelines.data.tars import TEXT_FIELDS, ShardCheck, iter_tar_samples

# ---------------------------------------------------------------- Ray Data


def _ray_decode(groups, cfg: DataConfig, report: tuple[str, str, Counter]) -> Iterator[dict]:
    """`map_batches` UDF, fused into the read task: rows that are groups of raw samples
    (`_tar_datasource`) -> rows that are whole batches, yielded one at a time (Ray streams
    a generator's outputs: memory holds one batch)."""
    import ray.data

    epoch = cfg.epoch + getattr(ray.data.DataContext.get_current(), "_execution_idx", 0)
    shard, first_key, counts = report
    for cell in groups.column("samples"):
        rows = _samples_from_arrow(cell)
        bad_shards = Counter()
        if counts and any(
            r["__key__"] == first_key and r.get("__url__", "").endswith(shard) for r in rows
        ):
            bad_shards = Counter(counts)  # once per epoch: with a fixed good sample
        for b in decode_group(rows, cfg, epoch):
            b["skipped"].update(bad_shards)
            bad_shards = Counter()
            yield to_row(b)


def build_dataset(cfg: DataConfig, check: ShardCheck | None = None):
    """A `ray.data.Dataset` of training batches (one row = one batch; read it through
    `BatchStream`). Each complete pass is the next epoch: a new seeded shard order and new
    draws. Raises `ValueError` when no shard is readable."""
    import ray.data

    check = readable_shards(cfg, check)
    first = sorted(check.good)[0]
    report = (first.rsplit("/", 1)[-1], check.first_keys[first], shard_counts(check))
    shuffle = _epoch_shuffle(cfg.seed, cfg.epoch) if cfg.shuffle_files else None
    # Ray Data logs "Starting execution" and the execution plan at every pass (every epoch
    # of every worker's split): two lines an epoch that tell a user nothing (issue 22)
    ray.data.DataContext.get_current().print_on_execution_start = False
    ds = ray.data.read_datasource(
        _tar_datasource(
            list(check.good),
            shuffle,
            cfg.max_member_bytes,
            {_shard_id(s): n for s in check.cut if (n := check.limit(s))},
            cfg.batch_size,
        ),
        num_cpus=cfg.num_cpus,
        override_num_blocks=len(check.good),
    )
    # batch_size=None: whole reader blocks, so Ray fuses read and decode into one task (with
    # a batch size it keeps them apart, and every sample's bytes cross the object store)
    ds = ds.map_batches(
        _ray_decode,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=cfg.num_cpus,
        concurrency=cfg.concurrency,
        fn_kwargs={"cfg": cfg, "report": report},
    )
    ds.context.execution_options.preserve_order = True  # same seed, same batch order
    # one block per row: a row is a whole group (read) or a whole batch (decode), so Ray never
    # merges batches into one block (it held a task's batches until it had 128 MiB: no
    # streaming) nor cuts a group; the trainer gets each batch as it is made
    ds.context.target_max_block_size = 1
    return ds


def _shard_id(path: str) -> str:
    """A shard's path as Ray's reader names it (scheme dropped, local paths absolute)."""
    return path.split("://", 1)[1] if "://" in path else os.path.abspath(path)


def _tar_datasource(
    paths: list[str], shuffle, max_member_bytes: int, limits: dict[str, int], group: int
):
    """Ray's file datasource over `tars.iter_tar_samples`, so both paths read members by
    the same rules (hostile names, links, oversized members are skipped unread; nothing is
    unpickled; a shard cut short is read up to the cut, `limits`). A row is a group of
    `group` consecutive samples of a shard (column `samples`, `_samples_to_arrow`), the
    decode's unit, as `batches.iter_raw_batches` groups them: Ray may cut blocks between
    rows, never in one."""
    from ray.data.datasource import FileBasedDatasource

    class TarSamples(FileBasedDatasource):
        def _read_stream(self, stream, path: str):
            samples = iter_tar_samples(path, max_member_bytes, stream, limits.get(_shard_id(path)))
            for rows in blocks_of(samples, group):
                yield _samples_to_arrow(rows)

    return TarSamples(paths, shuffle=shuffle)


# A group as one Arrow cell, list<map<string, binary>>: a sample's members keep their own
# names (shards mix mp4, jpg, json, ...). Arrow, not a pandas object cell: Ray sizes every
# block it buffers, twice a row, and for a pandas block of Python objects that is a walk over
# every object in it (Ray 2.60 `PandasBlockAccessor.size_bytes`; ~5 % of the decode task's
# CPU, BENCHMARKS.md Data); an Arrow block knows its size.
def _samples_to_arrow(rows: list[dict]):
    """One group of raw samples -> a one-row Arrow table (column `samples`)."""
    import pyarrow as pa

    def raw(v):  # a path from the file system may hold undecodable bytes (as surrogates)
        return v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v

    cell = [[(k, raw(v)) for k, v in r.items()] for r in rows]
    group = pa.list_(pa.map_(pa.string(), pa.binary()))
    return pa.table({"samples": pa.array([cell], type=group)})


def _samples_from_arrow(cell) -> list[dict]:
    """`_samples_to_arrow`'s cell -> the group's sample dicts, as `iter_tar_samples` gave."""
    rows = [dict(sample) for sample in cell.as_py()]
    for r in rows:
        for k in TEXT_FIELDS:
            if k in r:
                r[k] = r[k].decode("utf-8", "surrogateescape")
    return rows


def _epoch_shuffle(seed: int, first_epoch: int):
    """Ray's `FileShuffleConfig`, reseeded per execution as `shuffle_seed(seed, epoch)`."""
    from ray.data import FileShuffleConfig

    @dataclass
    class EpochShuffle(FileShuffleConfig):
        first_epoch: int = 0

        def get_seed(self, execution_idx: int = 0) -> int:
            return shuffle_seed(self.seed, self.first_epoch + execution_idx)

    return EpochShuffle(seed=seed, first_epoch=first_epoch)
