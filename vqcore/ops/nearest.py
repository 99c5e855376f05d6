"""Nearest-code search that never materialises the full N x K distance matrix.

The distance step is ||x||² - 2 x·e + ||e||²; rows of `x` are processed in chunks so the
extra memory is `chunk x K` floats, not `N x K` (N = 65,536, K = 8,192 would be 2 GiB in fp32).

On CUDA with Triton installed, `nearest_code` runs the fused kernel of
`vqcore.ops.triton_nearest` instead (distances and argmin in one pass, operands in the input's
dtype, fp32 accumulation; fp32 inputs as tf32). The switch: the `fused` argument, else the
environment variable VQCORE_FUSED (read at every call):
- "auto" or unset: fused when x is a CUDA tensor and Triton is importable;
- "0"/"off": always the chunked torch path (exact fp32 search, the reference);
- "1"/"on": always fused; an error where it cannot run (CPU tensors without TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch

from vqcore.ops import triton_nearest, triton_runtime

FUSED_ENV = "VQCORE_FUSED"
_FUSED_VALUES = {"": None, "auto": None, "0": False, "off": False, "1": True, "on": True}

# Extra memory one chunk of distances may take, in elements (64 Mi floats = 256 MiB in fp32).
DEFAULT_BUDGET_ELEMENTS = 1 << 24


def _chunk_rows(num_codes: int, budget: int) -> int:
    return max(1, budget // max(1, num_codes))


def fused_setting() -> bool | None:
    """VQCORE_FUSED as True (on), False (off) or None (auto)."""
    raw = os.environ.get(FUSED_ENV, "").strip().lower()
    if raw not in _FUSED_VALUES:
        raise ValueError(f"{FUSED_ENV} must be one of auto, on, off, 1, 0; got {raw!r}")
    return _FUSED_VALUES[raw]


def use_fused(x: torch.Tensor, fused: bool | None = None) -> bool:
    """Whether a search over `x` takes the fused kernel; `fused` None defers to VQCORE_FUSED.

    Auto means CUDA tensors with Triton importable; forcing it where it cannot run raises.
    """
    if fused is None:
        fused = fused_setting()
    if fused is None:
        return x.is_cuda and triton_runtime.available()
    if fused and not triton_runtime.can_run(x):
        why = "triton is not installed" if not triton_runtime.available() else "x is not on CUDA"
        raise RuntimeError(
            f"fused nearest-code search was forced ({FUSED_ENV}=1 or fused=True) but {why}; "
            "TRITON_INTERPRET=1 runs it on CPU in Triton's interpreter"
        )
    return fused


def squared_distances(x_nd: torch.Tensor, codebook_kd: torch.Tensor) -> torch.Tensor:
    """Full (N, K) squared L2 distances; for small N·K or tests only."""
    x = x_nd.float()
    e = codebook_kd.float()
    return x.pow(2).sum(1, keepdim=True) - 2 * x @ e.t() + e.pow(2).sum(1)[None]


@torch.no_grad()
def nearest_code(
    x_nd: torch.Tensor,
    codebook_kd: torch.Tensor,
    metric: str = "l2",
    budget_elements: int = DEFAULT_BUDGET_ELEMENTS,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code for every row, and its distance (l2: squared; cosine: 1 - cos).

    x_nd: (N, D) features, codebook_kd: (K, D). Returns codes (N,) int64 and dist (N,) fp32.
    The chunked path works in fp32 whatever the input dtype, so ties break the same way on
    every device; the fused path (`fused`, see the module docstring) rounds the operands to
    bf16/fp16/tf32 and may pick another code on near-ties (within the bound in
    `vqcore.ops.triton_nearest`). Exact ties go to the lowest index on both.
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"nearest_code: metric must be 'l2' or 'cosine', got {metric!r}")
    if use_fused(x_nd, fused):
        return triton_nearest.nearest_code_fused(x_nd, codebook_kd, metric)
    n, k = x_nd.shape[0], codebook_kd.shape[0]
    e = codebook_kd.float()
    if metric == "cosine":
        e = torch.nn.functional.normalize(e, dim=1)
    e_sq = e.pow(2).sum(1)
    codes = torch.empty(n, dtype=torch.long, device=x_nd.device)
    dists = torch.empty(n, dtype=torch.float32, device=x_nd.device)
    step = _chunk_rows(k, budget_elements)
    for start in range(0, n, step):
        x = x_nd[start : start + step].float()
        if metric == "cosine":
            x = torch.nn.functional.normalize(x, dim=1)
        # addmm fuses -2 x·eᵀ + ||e||² into one kernel and one (chunk, K) buffer.
        d = torch.addmm(e_sq[None], x, e.t(), alpha=-2.0)
        best, idx = d.min(dim=1)
        codes[start : start + step] = idx
        dists[start : start + step] = best + x.pow(2).sum(1)
    if metric == "cosine":
        dists = dists / 2  # ||a - b||² = 2 - 2cos for unit vectors
    return codes, dists


@torch.no_grad()
def nearest_feature_per_code(
    x_nd: torch.Tensor,
    codebook_kd: torch.Tensor,
    budget_elements: int = DEFAULT_BUDGET_ELEMENTS,
    fused: bool | None = None,
) -> torch.Tensor:
    """For every code, the row of `x` closest to it (CVQ-VAE's "closest" anchor).

    The same search as `nearest_code` with the roles swapped (the K codes search the N
    features), so the fused kernel runs it as such, cut over the features to fill the GPU
    (`fused`: as in `nearest_code`); the torch path is chunked over N. Exact ties go to the
    lowest row. Returns (K, D) features in x's dtype.
    """
    if use_fused(x_nd, fused):
        return x_nd[triton_nearest.nearest_code_fused(codebook_kd, x_nd)[0]]
    e = codebook_kd.float()
    k = e.shape[0]
    best = torch.full((k,), float("inf"), device=x_nd.device)
    best_idx = torch.zeros(k, dtype=torch.long, device=x_nd.device)
    step = _chunk_rows(k, budget_elements)
    for start in range(0, x_nd.shape[0], step):
        x = x_nd[start : start + step].float()
        # (K, n) layout: the min runs along contiguous rows; ||e||² is constant per row
        d = torch.addmm(x.pow(2).sum(1)[None], e, x.t(), alpha=-2.0)
        val, idx = d.min(dim=1)
        better = val < best
        best = torch.where(better, val, best)
        best_idx = torch.where(better, idx + start, best_idx)
    return x_nd[best_idx]
