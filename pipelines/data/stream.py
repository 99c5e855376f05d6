"""The consumer side of the data path: torch batches for the trainer, from the Ray Data
pipeline (`ray_dataset`, rows made by `batches.to_row`) or the plain iterator
(`iter_batches`). The data modules that import torch are this one and `inputs` (batches to
model input), both on the trainer's side: the decode stage and its Ray workers never do
(1.3 CPU-s and ~470 MB less a worker).

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

from pipelines.data.batches import DataConfig, from_row, iter_raw_batches, readable_shards

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
                video = channels_first(b["video"])
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


def channels_first(video_bthwc: np.ndarray) -> torch.Tensor:
    """uint8 `(B, T, H, W, 3)` -> torch `(B, 3, T, H, W)` without a copy: a view in
    `torch.channels_last_3d` memory format (`.contiguous()` makes it dense, e.g. on GPU)."""
    return torch.from_numpy(video_bthwc).permute(0, 4, 1, 2, 3)


def iter_batches(cfg: DataConfig, epoch: int | None = None) -> BatchStream:
    """Training batches of one epoch without Ray, as torch tensors (`batches.iter_raw_batches`
    through a `BatchStream`)."""
    return BatchStream(iter_raw_batches(cfg, epoch, readable_shards(cfg)))
