"""The consumer side of the data path: torch batches for the trainer, from the Ray Data
pipeline (`ray_dataset`) or the plain iterator (`batches.iter_batches`), and the Ray row
that carries one batch between them.

A batch (from `BatchStream`, for both paths) is a dict:
    video       torch.uint8 (B, 3, T, H, W)   B <= batch_size (memory rule, skipped samples);
                                              memory is channels_last_3d (a view of the
                                              decoders' layout, no transpose on the CPU);
                                              from Ray it is read-only: do not write in place
    num_frames  torch.int32 (B,)              real frames per sample; the rest is zero padding
    keys        list[str]                     sample keys
    skipped     dict[str, int]                samples skipped (by `decode.REASONS`) since
                                              the previous batch; `BatchStream.skipped` sums
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.data import decode as dec
from pipelines.data import sampling as smp

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
