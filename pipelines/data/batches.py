"""Training batches from WebDataset shards: a Ray Data pipeline and the same stages as a
plain Python iterator.

Stages: check shards (a file that is not a tar, a tar cut short or with broken keys is
counted as `bad_shard` and left out, so it cannot stop the read) -> read samples in a
seeded per-epoch file order -> per group of `batch_size` samples, draw one
(resolution, frames) pair (`sampling.draw_spec`), decode only the needed frames
(`decode`), random-resized crop, truncate/zero-pad -> fixed-shape uint8 batches (images
in batches of their own, T = 1).

A batch (from `BatchStream`, for both paths) is a dict:
    video       torch.uint8 (B, 3, T, H, W)   B <= batch_size (memory rule, skipped samples);
                                              memory is channels_last_3d (a view of the
                                              decoders' layout, no transpose on the CPU);
                                              from Ray it is read-only: do not write in place
    num_frames  torch.int32 (B,)              real frames per sample; the rest is zero padding
    keys        list[str]                     sample keys
    skipped     dict[str, int]                samples skipped (by `decode.REASONS`) since
                                              the previous batch; `BatchStream.skipped` sums
Ray: `build_dataset(cfg)` -> `ray.data.Dataset` whose rows are whole batches; pass it to
`TorchTrainer(datasets=...)` and read `BatchStream(get_dataset_shard(name))` in the worker.
Plain: `iter_batches(cfg)`. Both are deterministic for a given `seed` and `epoch`.
"""

from __future__ import annotations

import itertools
import os
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.data import decode as dec
from pipelines.data import sampling as smp
from pipelines.data.tars import (
    MAX_MEMBER_BYTES,
    ShardCheck,
    check_shards,
    iter_tar_samples,
    list_shards,
)


@dataclass
class DataConfig:
    """Where the shards are and what batches to make from them."""

    shards: tuple[str, ...] = ()  # .tar files, folders of them, globs, or s3://… URIs
    resolutions: tuple[tuple[int, int], ...] = smp.SEED_RESOLUTIONS  # (H, W) pairs
    frame_counts: tuple[int, ...] = smp.SEED_FRAME_COUNTS  # T per batch; 1 = image batches
    batch_size: int = 8  # samples per batch at most (the memory rule may give fewer)
    memory_budget_bytes: int = 3 << 30  # uint8 bytes of one output batch (see sampling)
    frame_stride: int = 1  # take every k-th frame
    min_frames: int = 1  # a video with fewer real frames is "too_short" (images: 1 frame, kept)
    crop_scale: tuple[float, float] = (0.8, 1.0)  # area fraction of the random-resized crop
    max_decode_side: int = 4096  # frames are never decoded larger than this
    max_member_bytes: int = MAX_MEMBER_BYTES  # a larger tar member is skipped unread: too_large
    backend: str = dec.DEFAULT_BACKEND  # "decord" or "pyav" (decord falls back to PyAV)
    # False: every video's container header is read and wins over its JSON (`decode.sample_meta`;
    # a header read costs about as much as decoding 4 frames at 32²). True: a complete JSON is
    # used as is (shards `vqtok shards` wrote); missing metadata is probed either way
    trust_metadata: bool = False
    seed: int = 42
    epoch: int = 0  # first epoch; each later pass over a Ray Dataset is the next one
    shuffle_files: bool = True  # new seeded shard order every epoch
    center: bool = False  # no random crop or window: the centred full crop, first frames
    num_cpus: float = 0.5  # per Ray read/decode task; < 1 so Train workers fit on 2 cores
    concurrency: int | None = None  # Ray decode tasks in flight (None: Ray decides)

    def __post_init__(self):
        self.shards = (self.shards,) if isinstance(self.shards, str) else tuple(self.shards)
        self.resolutions = tuple((int(h), int(w)) for h, w in self.resolutions)
        self.frame_counts = tuple(int(t) for t in self.frame_counts)
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        checks = {
            "resolutions": bool(self.resolutions) and all(min(r) > 0 for r in self.resolutions),
            "frame_counts": bool(self.frame_counts) and min(self.frame_counts) > 0,
            "batch_size": self.batch_size > 0,
            "frame_stride": self.frame_stride > 0,
            "min_frames": 0 < self.min_frames <= min(self.frame_counts or (1,)),
            "crop_scale": 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "max_decode_side": self.max_decode_side > 0,
            "max_member_bytes": self.max_member_bytes > 0,
            "backend": self.backend in dec.BACKENDS,
            "seed": self.seed >= 0,
            "epoch": self.epoch >= 0,
            "num_cpus": self.num_cpus > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DataConfig.{name}: invalid value {getattr(self, name)!r}")
        largest = max(
            smp.sample_bytes(h, w, t) for h, w in self.resolutions for t in self.frame_counts
        )
        if largest > self.memory_budget_bytes:
            raise ValueError(
                f"DataConfig.memory_budget_bytes={self.memory_budget_bytes} is smaller than one "
                f"sample of the largest (resolution, frames) pair ({largest} bytes)"
            )


# ---------------------------------------------------------------- decode stage (shared)


def media_of(row: dict) -> tuple[str, bytes]:
    """(extension, bytes) of a sample's first video or image member; `BadSample(no_media)`."""
    for ext in dec.VIDEO_EXTS + dec.IMAGE_EXTS:
        value = row.get(ext)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return ext, bytes(value)
    raise dec.BadSample("no_media")


def decode_sample(
    row: dict, spec: smp.BatchSpec, rng: np.random.Generator, cfg: DataConfig, out: np.ndarray
) -> int:
    """Decode one sample into `out`, a zeroed uint8 `(T, H, W, 3)` batch slot (frames past
    the clip stay zero); returns the number of real frames. Raises `decode.BadSample`
    before writing anything to `out`, so a failed sample leaves its slot zero and free."""
    skip = row.get("__skip__")  # a member the tar reader refused (tars.member_problem)
    if isinstance(skip, str):
        reason, _, detail = skip.partition(": ")
        raise dec.BadSample(reason, detail)
    ext, data = media_of(row)
    raw = row.get("json") if isinstance(row.get("json"), (bytes, str)) else None
    kind = "image" if ext in dec.IMAGE_EXTS else "video"
    meta, _ = dec.sample_meta(raw, kind, data, trust=cfg.trust_metadata)
    out_hw = (spec.height, spec.width)
    rng = None if cfg.center else rng
    if ext in dec.IMAGE_EXTS:  # a clip of one frame
        src_hw = (meta.height, meta.width)
        top, left, bh, bw = smp.crop_box(rng, src_hw, out_hw, cfg.crop_scale)
        frames = dec.decode_image(data, (round(top), round(left), round(bh), round(bw)), out_hw)
        out[0] = frames[0]
        return 1
    idx = smp.frame_window(rng, meta.frames, spec.num_frames, cfg.frame_stride)
    if len(idx) < cfg.min_frames:
        raise dec.BadSample("too_short", f"{len(idx)} < min_frames={cfg.min_frames}")
    box = smp.crop_box(rng, (meta.height, meta.width), out_hw, cfg.crop_scale)
    dec_hw, ibox = smp.decode_plan((meta.height, meta.width), box, out_hw, cfg.max_decode_side)
    frames = dec.decode_video(data, idx, size=dec_hw, backend=cfg.backend)
    if len(frames) < cfg.min_frames:
        raise dec.BadSample("truncated", f"{len(frames)} of {len(idx)} frames decoded")
    return smp.crop_resize(frames, ibox, out_hw, out=out).shape[0]


def batch_rng(keys: list[str], seed: int, epoch: int) -> np.random.Generator:
    """The batch's RNG: a function of (seed, epoch, its sample keys) only, so the draw does
    not depend on which worker or process decodes it."""
    return np.random.default_rng([seed, epoch, zlib.crc32("\n".join(keys).encode())])


def is_image(row: dict) -> bool:
    """True when the sample's media is an image (known before decoding, from its key)."""
    return any(isinstance(row.get(ext), (bytes, bytearray, memoryview)) for ext in dec.IMAGE_EXTS)


def decode_group(
    rows: list[dict], cfg: DataConfig, epoch: int, errors: list | None = None
) -> Iterator[dict]:
    """A group of raw samples -> batches of one drawn (resolution, frames), yielded as each
    fills (`spec.batch_size` from the memory rule), so at most one batch is held at a time.

    Images go to batches of their own, T = 1 at the drawn resolution (after the clips), so
    no image is padded in time (issue 25); a clip shorter than T is (`num_frames` says so).

    Bad samples are skipped and counted: each batch's `skipped` holds the skips since the
    previous one (a last batch with B = 0 carries trailing skips). `errors`, if given,
    collects `(key, reason, detail)`. Yields numpy batches, video uint8 `(B, T, H, W, 3)`."""
    keys = [str(r.get("__key__", "")) for r in rows]
    rng = batch_rng(keys, cfg.seed, epoch)
    spec = smp.draw_spec(
        rng, cfg.resolutions, cfg.frame_counts, cfg.batch_size, cfg.memory_budget_bytes
    )
    work = list(zip(keys, rows, rng.spawn(len(rows))))
    if spec.num_frames > 1:
        still = smp.BatchSpec(spec.height, spec.width, 1, smp.batch_size_for(
            spec.height, spec.width, 1, cfg.batch_size, cfg.memory_budget_bytes))  # fmt: skip
        parts = [(spec, [w for w in work if not is_image(w[1])]),
                 (still, [w for w in work if is_image(w[1])])]  # fmt: skip
    else:
        parts = [(spec, work)]
    pending, emitted = Counter(), False  # skips not yet handed on with a batch
    for part_spec, part in parts:
        for batch in _fill(part, part_spec, cfg, errors, pending):
            emitted = True
            yield batch
    if pending or not emitted:
        yield _empty_batch(spec.num_frames, spec.height, spec.width, pending)


def _fill(work: list, spec: smp.BatchSpec, cfg: DataConfig, errors: list | None,
          skipped: Counter) -> Iterator[dict]:  # fmt: skip
    """Decode `(key, row, rng)` triples into batches of `spec`; `skipped` collects skips and
    is handed on (then cleared) with each batch. A last partial batch is yielded."""
    shape = (spec.batch_size, spec.num_frames, spec.height, spec.width, 3)  # channel-last

    def finish(b: dict) -> dict:
        n = len(b["keys"])
        out = {
            "video": b["video"][:n],
            "num_frames": np.asarray(b["num_frames"], np.int32),
            "keys": b["keys"],
            "skipped": Counter(skipped),
        }
        skipped.clear()
        return out

    batch = None
    for key, row, srng in work:
        if batch is None:
            batch = {"video": np.zeros(shape, np.uint8), "num_frames": [], "keys": []}
        slot = batch["video"][len(batch["keys"])]
        try:
            real = decode_sample(row, spec, srng, cfg, slot)
        except Exception as e:  # noqa: BLE001 - nothing in one sample may stop the stream
            bad = e if isinstance(e, dec.BadSample) else dec.BadSample("decode_error", repr(e))
            skipped[bad.reason] += 1
            if errors is not None:
                errors.append((key, bad.reason, bad.detail))
            continue
        batch["num_frames"].append(real)
        batch["keys"].append(key)
        if len(batch["keys"]) == spec.batch_size:
            yield finish(batch)
            batch = None
    if batch is not None and batch["keys"]:
        yield finish(batch)


# ---------------------------------------------------------------- plain iterator


def shuffle_seed(seed: int, epoch: int) -> int:
    """The file-order seed of one epoch (used by both paths)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_order(shards: list[str], seed: int, epoch: int, shuffle: bool = True) -> list[str]:
    """The shard order of one epoch: the same permutation Ray's file shuffle applies."""
    out = list(shards)
    if shuffle:
        np.random.default_rng(shuffle_seed(seed, epoch)).shuffle(out)
    return out


def iter_raw_batches(cfg: DataConfig, epoch: int | None = None, check: ShardCheck | None = None):
    """Plain-Python stages, no Ray: yields numpy batches as `decode_group` makes them.

    Samples are grouped as Ray Data groups them for `map_batches` (reader blocks of at
    most 512 rows, gathered until they hold `batch_size` rows, then cut into batches), so
    for the same seed and epoch both paths give the same batches."""
    epoch = cfg.epoch if epoch is None else epoch
    check = readable_shards(cfg, check)
    if check.bad or check.cut:
        yield _skip_only(cfg, shard_counts(check))
    bundle: list[dict] = []
    for shard in epoch_order(check.good, cfg.seed, epoch, cfg.shuffle_files):
        try:
            samples = iter_tar_samples(shard, cfg.max_member_bytes, limit=check.limit(shard))
            for block in _blocks(samples, READER_BLOCK_ROWS):
                bundle.extend(block)
                if len(bundle) >= cfg.batch_size:
                    for i in range(0, len(bundle), cfg.batch_size):
                        yield from decode_group(bundle[i : i + cfg.batch_size], cfg, epoch)
                    bundle = []
        except Exception:  # noqa: BLE001 - changed since the check: count, go on
            yield _skip_only(cfg, Counter({"bad_shard": 1}))
    if bundle:
        yield from decode_group(bundle, cfg, epoch)


READER_BLOCK_ROWS = 512  # rows per block of the Ray reader (as Ray's webdataset reader)


def _blocks(rows: Iterator[dict], n: int) -> Iterator[list[dict]]:
    it = iter(rows)
    return iter(lambda: list(itertools.islice(it, n)), [])


def shard_counts(check: ShardCheck) -> Counter:
    """What the shard check left out, counted once an epoch: `bad_shard` (refused whole)
    and `cut_shard` (cut short: read up to the cut)."""
    return Counter({k: n for k, n in (("bad_shard", len(check.bad)), ("cut_shard", len(check.cut)))
                    if n})  # fmt: skip


def _skip_only(cfg: DataConfig, skipped: Counter) -> dict:
    (h, w) = cfg.resolutions[0]
    return _empty_batch(cfg.frame_counts[0], h, w, skipped)


def _empty_batch(t: int, h: int, w: int, skipped: Counter) -> dict:
    """A batch of no samples that hands on skip counts."""
    return {"video": np.zeros((0, t, h, w, 3), np.uint8), "num_frames": np.zeros(0, np.int32),
            "keys": [], "skipped": skipped}  # fmt: skip


def readable_shards(cfg: DataConfig, check: ShardCheck | None = None) -> ShardCheck:
    """`check_shards` over `cfg.shards`; raises `ValueError` when none is readable."""
    check = check or check_shards(list_shards(cfg.shards))
    if not check.good:
        raise ValueError(f"no readable shards in {cfg.shards!r}: {check.bad}")
    return check


def iter_batches(cfg: DataConfig, epoch: int | None = None) -> BatchStream:
    """Training batches of one epoch without Ray, as torch tensors (see module doc)."""
    return BatchStream(iter_raw_batches(cfg, epoch, readable_shards(cfg)))


# ---------------------------------------------------------------- batch <-> Ray row


def to_row(b: dict | None, skipped: Counter | None = None) -> dict[str, np.ndarray]:
    """One batch as one Ray Data row (columns of length 1): `video` and `num_frames` as
    objects (no copy), keys joined by newlines, one `skip_<reason>` count per reason.
    `b=None`: an empty batch, a row that only carries the counts `skipped`."""
    video, nums = np.empty(1, object), np.empty(1, object)
    video[0] = b["video"] if b else np.zeros((0, 1, 1, 1, 3), np.uint8)
    nums[0] = np.asarray(b["num_frames"] if b else [], np.int32)
    skipped = b["skipped"] if b else (skipped or Counter())
    cols = {"video": video, "num_frames": nums,
            "keys": np.array(["\n".join(b["keys"] if b else [])], object)}  # fmt: skip
    for reason in dec.REASONS:
        cols[f"skip_{reason}"] = np.array([skipped.get(reason, 0)], np.int64)
    return cols


def from_row(row: dict) -> dict:
    """The batch of one row (`row[col]` = that row's value), inverse of `to_row`; `video`
    only when the row carries it."""
    keys = str(row["keys"])
    out = {"num_frames": np.asarray(row["num_frames"], np.int32),
           "keys": keys.split("\n") if keys else [],
           "skipped": Counter({r: int(row[f"skip_{r}"]) for r in dec.REASONS
                               if int(row[f"skip_{r}"])})}  # fmt: skip
    if "video" in row:
        out["video"] = np.asarray(row["video"])
    return out


# ---------------------------------------------------------------- Ray Data


def _ray_decode(batch: dict, cfg: DataConfig, report: tuple[str, str, Counter]) -> Iterator[dict]:
    """`map_batches` UDF: raw webdataset columns -> rows that are whole batches, yielded one
    at a time (Ray streams a generator's outputs: memory holds one batch, not the group)."""
    import ray.data

    epoch = cfg.epoch + getattr(ray.data.DataContext.get_current(), "_execution_idx", 0)
    n = len(batch["__key__"])
    rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    shard, first_key, counts = report
    if counts and any(
        str(r["__key__"]) == first_key and str(r.get("__url__", "")).endswith(shard) for r in rows
    ):
        bad_shards = Counter(counts)  # once per epoch: with a fixed good sample
    else:
        bad_shards = Counter()
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
        _tar_datasource(list(check.good), shuffle, cfg.max_member_bytes,
                        {_shard_id(s): n for s in check.cut if (n := check.limit(s))}),
        num_cpus=cfg.num_cpus,
        override_num_blocks=len(check.good),
    )
    ds = ds.map_batches(
        _ray_decode,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.num_cpus,
        concurrency=cfg.concurrency,
        fn_kwargs={"cfg": cfg, "report": report},
    )
    ds.context.execution_options.preserve_order = True  # same seed, same batch order
    return ds


def _shard_id(path: str) -> str:
    """A shard's path as Ray's reader names it (scheme dropped, local paths absolute)."""
    return path.split("://", 1)[1] if "://" in path else os.path.abspath(path)


def _tar_datasource(paths: list[str], shuffle, max_member_bytes: int, limits: dict[str, int]):
    """Ray's file datasource over `tars.iter_tar_samples`, so both paths read members by
    the same rules (hostile names, links, oversized members are skipped unread; nothing is
    unpickled; a shard cut short is read up to the cut, `limits`); blocks of
    `READER_BLOCK_ROWS` samples, as Ray's `read_webdataset` makes."""
    import pandas as pd
    from ray.data.datasource import FileBasedDatasource

    class TarSamples(FileBasedDatasource):
        def _read_stream(self, stream, path: str):
            for block in _blocks(
                iter_tar_samples(path, max_member_bytes, stream, limits.get(_shard_id(path))),
                READER_BLOCK_ROWS,
            ):
                yield pd.DataFrame.from_records(block)

    return TarSamples(paths, shuffle=shuffle)


def _epoch_shuffle(seed: int, first_epoch: int):
    """Ray's `FileShuffleConfig`, reseeded per execution as `shuffle_seed(seed, epoch)`."""
    from ray.data import FileShuffleConfig

    @dataclass
    class EpochShuffle(FileShuffleConfig):
        first_epoch: int = 0

        def get_seed(self, execution_idx: int = 0) -> int:
            return shuffle_seed(self.seed, self.first_epoch + execution_idx)

    return EpochShuffle(seed=seed, first_epoch=first_epoch)


# ---------------------------------------------------------------- the consumer


@dataclass
class BatchStream:
    """Iterates torch batches from a Ray `Dataset`/`DataIterator` (e.g. Ray Train's
    `get_dataset_shard`) or from numpy batches (`iter_raw_batches`), and keeps totals:
    `samples`, `batches`, `skipped` (Counter by reason). `metrics()` gives them flat."""

    source: object
    prefetch_batches: int = 1
    samples: int = 0
    batches: int = 0
    skipped: Counter = field(default_factory=Counter)

    def _numpy_batches(self) -> Iterator[dict]:
        if not hasattr(self.source, "iter_batches"):
            yield from self.source
            return
        for block in self.source.iter_batches(
            batch_size=None, batch_format="numpy", prefetch_batches=self.prefetch_batches
        ):
            for i in range(len(block["keys"])):
                yield from_row({k: v[i] for k, v in block.items()})

    def __iter__(self) -> Iterator[dict]:
        pending = Counter()
        for b in self._numpy_batches():
            pending.update(b["skipped"])
            self.skipped.update(b["skipped"])
            if len(b["keys"]) == 0:
                continue
            self.samples += len(b["keys"])
            self.batches += 1
            with warnings.catch_warnings():  # Ray's arrays are read-only views: no copy
                warnings.simplefilter("ignore", UserWarning)
                video = smp.channels_first(b["video"])
                nums = torch.from_numpy(b["num_frames"])
            yield {
                "video": video,
                "num_frames": nums,
                "keys": list(b["keys"]),
                "skipped": dict(pending),
            }
            pending = Counter()

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat totals for a metrics logger: samples, batches, skipped total and by reason."""
        out = {
            f"{prefix}samples": self.samples,
            f"{prefix}batches": self.batches,
            f"{prefix}skipped": sum(self.skipped.values()),
        }
        out.update({f"{prefix}skipped_{r}": n for r, n in sorted(self.skipped.items())})
        return out
