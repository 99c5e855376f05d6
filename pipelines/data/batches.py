"""Training batches from WebDataset shards: the decode stage and a plain Python iterator
over it (the Ray Data pipeline over the same stage is `ray_dataset`).

Stages: check shards (a file that is not a tar, a tar cut short or with broken keys is
counted as `bad_shard` and left out, so it cannot stop the read) -> read samples in a
seeded per-epoch file order -> per group of `batch_size` samples, draw one
(resolution, frames) pair (`sampling.draw_spec`), decode only the needed frames, scaled by
the decoder so the random-resized crop is the output size (`decode`, `sampling.decode_plan`),
crop, truncate/zero-pad -> fixed-shape uint8 batches (images in batches of their own, T = 1).
Batches reach the trainer as `stream.BatchStream` batches (the format is described there);
between a Ray task and the trainer a batch travels as one Ray Data row (`to_row`,
`from_row`). This module and the ones it imports are numpy only (no torch): they run in the
decode workers.
Plain: `iter_raw_batches(cfg)` (as torch: `stream.iter_batches`); Ray:
`ray_dataset.build_dataset(cfg)`. Both are deterministic for a given `seed` and `epoch` and
give the same batches.
"""

from __future__ import annotations

import itertools
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

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
    backend: str = dec.DEFAULT_BACKEND  # "pyav" or "decord" (decord falls back to PyAV)
    # False: every video's container header is read and wins over its JSON (`decode.sample_meta`;
    # a header read costs about as much as decoding 4 frames at 32²). True: a complete JSON is
    # used as is (shards `vqtok shards` wrote); missing metadata is probed either way
    trust_metadata: bool = False
    seed: int = 42
    epoch: int = 0  # first epoch; each later pass over a Ray Dataset is the next one
    shuffle_files: bool = True  # new seeded shard order every epoch
    center: bool = False  # no random crop or window: the centred full crop, first frames
    num_cpus: float = 0.5  # per Ray read/decode task; < 1 so Train workers fit on 2 cores
    # Ray decode tasks in flight (None: Ray decides); a number keeps the read a task of its own
    # (Ray fuses read and decode only without one), so every sample crosses the object store
    concurrency: int | None = None

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
    out_hw = (spec.height, spec.width)
    rng = None if cfg.center else rng
    if ext in dec.IMAGE_EXTS:  # a clip of one frame
        meta, _ = dec.sample_meta(raw, "image", data)
        top, left, bh, bw = smp.crop_box(rng, (meta.height, meta.width), out_hw, cfg.crop_scale)
        frames = dec.decode_image(data, (round(top), round(left), round(bh), round(bw)), out_hw)
        out[0] = frames[0]
        return 1
    with dec.VideoFile(data, cfg.backend) as video:  # one open: probe, then the window
        meta, _ = dec.sample_meta(raw, "video", data, cfg.trust_metadata, probe=video.probe)
        idx = smp.frame_window(rng, meta.frames, spec.num_frames, cfg.frame_stride)
        if len(idx) < cfg.min_frames:
            raise dec.BadSample("too_short", f"{len(idx)} < min_frames={cfg.min_frames}")
        box = smp.crop_box(rng, (meta.height, meta.width), out_hw, cfg.crop_scale)
        dec_hw, ibox = smp.decode_plan((meta.height, meta.width), box, out_hw, cfg.max_decode_side)
        frames = video.read(idx, size=dec_hw)
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


# ---------------------------------------------------------------- batch <-> Ray row


def to_row(b: dict | None, skipped: Counter | None = None) -> dict[str, np.ndarray]:
    """One batch as one Ray Data row (columns of length 1): `video` as a tensor column (the
    batch array with a leading axis of 1, no copy: Ray stores it as an Arrow tensor, not a
    pickle), `num_frames` as an object, keys joined by newlines, one `skip_<reason>` count
    per reason.
    `b=None`: an empty batch, a row that only carries the counts `skipped`."""
    nums = np.empty(1, object)
    video = (b["video"] if b else np.zeros((0, 1, 1, 1, 3), np.uint8))[None]
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

    Samples are grouped as the Ray pipeline groups them (`ray_dataset`): each shard's
    samples in order, cut into groups of `batch_size` (a shard's last group may be
    smaller), so for the same seed and epoch both paths give the same batches."""
    epoch = cfg.epoch if epoch is None else epoch
    check = readable_shards(cfg, check)
    if check.bad or check.cut:
        yield _skip_only(cfg, shard_counts(check))
    for shard in epoch_order(check.good, cfg.seed, epoch, cfg.shuffle_files):
        try:
            samples = iter_tar_samples(shard, cfg.max_member_bytes, limit=check.limit(shard))
            for group in blocks_of(samples, cfg.batch_size):
                yield from decode_group(group, cfg, epoch)
        except Exception:  # noqa: BLE001 - changed since the check: count, go on
            yield _skip_only(cfg, Counter({"bad_shard": 1}))


def blocks_of(rows: Iterator[dict], n: int) -> Iterator[list[dict]]:
    """`rows` in lists of at most `n`."""
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
