"""Differentiable, batched FFT and DWT features for channel-first tensors.

Used by the PVQ-VAE encoder branches (seed 004, sec. 2.1 and 3.2-3.3: an FFT branch for
global structure and a wavelet (DWT) branch for local detail), usable on any (B, C, *S).

Shape legend: B batch, C channels, S spatial dims ((H, W) or (T, H, W)), K = 2^len(axes)
sub-bands of one DWT level, ordered by a bit mask: bit j of the index is 1 where the
sub-band is high-pass along `axes[j]` (index 0 = all low-pass = the approximation).

FFT:  `fft_features(x, ndim)` stacks real/imag (or log-amplitude and phase) of
      `torch.fft.rfftn` over the last `ndim` dims; `ifft_features` inverts "realimag".
DWT:  `dwt(x, axes)` / `idwt(c, axes)` are one separable level as strided conv1d with the
      filters of `pywt.Wavelet(name).filter_bank`, periodized boundaries (pywt mode
      "periodization"): every axis in `axes` halves exactly and the inverse is exact.
      `wavedec` / `waverec` run several levels, each with its own axes (e.g. per-frame 2D
      levels `(-2, -1)` then 3D levels `(-3, -2, -1)`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

FFT_MODES = ("realimag", "amp_phase")


# --- FFT -----------------------------------------------------------------------------------


def fft_features(x: torch.Tensor, ndim: int, mode: str = "realimag") -> torch.Tensor:
    """(B, C, *S) -> (B, 2C or 3C, *S_f), S_f = S with the last dim n//2+1 (rfftn, "ortho").

    "realimag": [Re, Im] (2C channels; invertible with `ifft_features`).
    "amp_phase": [log(1+|X|), cos φ, sin φ] (3C channels; smooth, no atan2 at |X| = 0).
    Computed in float32 whatever the input dtype (cuFFT has no bf16 kernels).
    """
    if mode not in FFT_MODES:
        raise ValueError(f"fft_features: mode must be one of {FFT_MODES}, got {mode!r}")
    if not 1 <= ndim <= x.dim() - 2:
        raise ValueError(f"fft_features: ndim must be in [1, {x.dim() - 2}], got {ndim}")
    spec = torch.fft.rfftn(x.float(), dim=tuple(range(-ndim, 0)), norm="ortho")
    if mode == "realimag":
        return torch.cat([spec.real, spec.imag], dim=1)
    amp = spec.abs()
    inv = 1.0 / amp.clamp_min(1e-6)
    return torch.cat([torch.log1p(amp), spec.real * inv, spec.imag * inv], dim=1)


def ifft_features(f: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Inverse of `fft_features(x, len(size), "realimag")`: (B, 2C, *S_f) -> (B, C, *size)."""
    re, im = f.float().chunk(2, dim=1)
    ndim = len(size)
    return torch.fft.irfftn(
        torch.complex(re, im), s=tuple(size), dim=tuple(range(-ndim, 0)), norm="ortho"
    )


# --- DWT -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def filter_bank(wavelet: str) -> np.ndarray:
    """(4, F) float64: dec_lo, dec_hi, rec_lo, rec_hi from pywavelets."""
    import pywt

    try:
        bank = pywt.Wavelet(wavelet).filter_bank
    except ValueError as e:
        raise ValueError(f"dwt: unknown wavelet {wavelet!r} ({e})") from None
    return np.asarray(bank, dtype=np.float64)


Wavelet = str | torch.Tensor  # a pywt name, or its (4, F) bank from `wavelet_bank`


def wavelet_bank(wavelet: Wavelet, like: torch.Tensor | None = None) -> torch.Tensor:
    """(4, F) tensor dec_lo, dec_hi, rec_lo, rec_hi in `like`'s dtype and device. Modules keep
    it as a buffer and pass it to `dwt`/`idwt`, so no filter is built or copied per call."""
    if isinstance(wavelet, str):
        wavelet = torch.as_tensor(filter_bank(wavelet))
    if like is not None:
        wavelet = wavelet.to(dtype=like.dtype, device=like.device)
    return wavelet


def _move_last(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Size]:
    """Put `axis` last and flatten the rest: (..., L, ...) -> (N, 1, L), plus the moved shape."""
    moved = x.movedim(axis, -1)
    return moved.reshape(-1, 1, moved.shape[-1]), moved.shape


def _dwt1(x: torch.Tensor, axis: int, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One periodized level along `axis`: x -> (low, high), each half as long.

    cA[k] = Σ_m dec_lo[m] · x[(2k + F/2 − m) mod L] (pywt "periodization", F even taps), as a
    stride-2 conv1d (a correlation, hence the flipped filters) over x circularly padded by
    F/2 − 1 samples on each side.
    """
    length = x.shape[axis]
    if length % 2:
        raise ValueError(
            f"dwt: length {length} along axis {axis} of shape {tuple(x.shape)} "
            "must be even (pad the input first)"
        )
    flat, moved = _move_last(x, axis)
    w = bank[:2].flip(-1).unsqueeze(1)  # (2, 1, F)
    pad = w.shape[-1] // 2 - 1
    if pad > 0:
        idx = torch.arange(-pad, length + pad, device=x.device) % length
        flat = flat.index_select(-1, idx)
    out = F.conv1d(flat, w, stride=2)  # (N, 2, L/2)
    lo, hi = (o.reshape(*moved[:-1], length // 2).movedim(-1, axis) for o in out.unbind(1))
    return lo, hi


def _idwt1(lo: torch.Tensor, hi: torch.Tensor, axis: int, bank: torch.Tensor) -> torch.Tensor:
    """Inverse of `_dwt1`: x[n] = Σ_k cA[k] rec_lo[i − 2k] + cD[k] rec_hi[i − 2k],
    n = (i − (F/2 − 1)) mod L: a stride-2 transposed conv folded back circularly."""
    length = 2 * lo.shape[axis]
    flat_lo, moved = _move_last(lo, axis)
    flat_hi, _ = _move_last(hi, axis)
    w = bank[2:].unsqueeze(1)  # (2, 1, F)
    y = F.conv_transpose1d(torch.cat([flat_lo, flat_hi], 1), w, stride=2)  # (N, 1, L + F - 2)
    y = y.squeeze(1)
    taps = w.shape[-1]
    if taps > 2:
        idx = (torch.arange(y.shape[-1], device=y.device) - (taps // 2 - 1)) % length
        y = torch.zeros(y.shape[0], length, dtype=y.dtype, device=y.device).index_add(1, idx, y)
    return y.reshape(*moved[:-1], length).movedim(-1, axis)


def _norm_axes(x: torch.Tensor, axes: Sequence[int]) -> tuple[int, ...]:
    spatial = x.dim() - 2
    if not axes or len(set(axes)) != len(axes) or not all(-spatial <= a < 0 for a in axes):
        raise ValueError(
            f"dwt: axes must be distinct spatial axes in [-{spatial}, -1] of a "
            f"(B, C, *S) tensor of shape {tuple(x.shape)}, got {tuple(axes)}"
        )
    return tuple(axes)


def dwt(x: torch.Tensor, axes: Sequence[int] = (-2, -1), wavelet: Wavelet = "haar") -> torch.Tensor:
    """One separable DWT level: (B, C, *S) -> (B, K, C, *S'), S' halves S along `axes`.

    The sub-band dim is folded into the batch, so each axis costs one conv1d."""
    axes = _norm_axes(x, axes)
    bank = wavelet_bank(wavelet, x)
    bands = x.unsqueeze(1)  # (B, 1, C, *S); index = bit mask over the axes done so far
    for a in axes:
        lo, hi = _dwt1(bands, a, bank)
        bands = torch.cat([lo, hi], dim=1)
    return bands


def idwt(
    c: torch.Tensor, axes: Sequence[int] = (-2, -1), wavelet: Wavelet = "haar"
) -> torch.Tensor:
    """Inverse of `dwt`: (B, K, C, *S') -> (B, C, *S)."""
    axes = _norm_axes(c[:, 0], axes)
    if c.shape[1] != 2 ** len(axes):
        raise ValueError(
            f"idwt: expected {2 ** len(axes)} sub-bands for axes {axes}, got shape {tuple(c.shape)}"
        )
    bank = wavelet_bank(wavelet, c)
    for a in reversed(axes):
        lo, hi = c.chunk(2, dim=1)
        c = _idwt1(lo, hi, a, bank)
    return c[:, 0]


def wavedec(
    x: torch.Tensor, level_axes: Sequence[Sequence[int]], wavelet: Wavelet = "haar"
) -> list[torch.Tensor]:
    """Multi-level DWT: level l transforms the approximation of level l−1 along
    `level_axes[l]`. Returns all sub-bands of every level, [(B, K_l, C, *S_l)] fine to coarse;
    sub-band 0 of level l is the approximation that level l+1 decomposes."""
    levels = []
    for axes in level_axes:
        x = dwt(x, axes, wavelet)
        levels.append(x)
        x = x[:, 0]
    return levels


def waverec(
    levels: Sequence[torch.Tensor], level_axes: Sequence[Sequence[int]], wavelet: Wavelet = "haar"
) -> torch.Tensor:
    """Inverse of `wavedec`: uses the coarsest approximation and every level's details
    (sub-band 0 of the finer levels is recomputed, not read)."""
    if len(levels) != len(level_axes) or not levels:
        raise ValueError(f"waverec: {len(levels)} levels but {len(level_axes)} axes entries")
    approx = idwt(levels[-1], level_axes[-1], wavelet)
    for c, axes in zip(reversed(levels[:-1]), reversed(level_axes[:-1])):
        approx = idwt(torch.cat([approx.unsqueeze(1), c[:, 1:]], 1), axes, wavelet)
    return approx
