"""Counting codes with no host sync: fixed-size outputs whatever the data.

`torch.bincount` and `torch.unique` size their output from the data, which on CUDA reads a
value back to the host (a sync every step) and under torch.compile is a graph break. These
give the same counts in tensors whose size depends on shapes alone.
"""

from __future__ import annotations

import torch


def bincount(index: torch.Tensor, size: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """torch.bincount(index, minlength=size) for indices in [0, size): (size,) counts."""
    flat = index.reshape(-1)
    counts = torch.zeros(size, dtype=dtype, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=dtype))


def run_lengths(codes_n: torch.Tensor) -> torch.Tensor:
    """(N,) float counts of each distinct code in `codes_n` followed by zeros: the counts of
    torch.unique(return_counts=True) in a fixed-size tensor (for code spaces too large for a
    histogram, e.g. LFQ with 2^16 codes and more)."""
    flat = codes_n.reshape(-1)
    s = flat.sort().values
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[1:] = s[1:] != s[:-1]
    run = starts.cumsum(0) - 1  # index of each token's run
    counts = torch.zeros(flat.numel(), device=flat.device)
    return counts.scatter_add_(0, run, torch.ones_like(counts))
