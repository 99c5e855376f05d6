"""Tiled application of a resolution-changing function over the last two (H, W) dims.

`tiled(fn, x, tile, overlap, scale)` cuts x into overlapping `tile`×`tile` windows (last
windows aligned to the far edge), runs `fn` on each, and blends the outputs with linear
ramps over the overlap (weights normalised to sum to 1 everywhere). `fn` maps a window of
size (h, w) to an output of size (h·scale, w·scale) (scale = 1/f for an encoder trunk,
f for a decoder trunk). Only the windows' activations are alive at once, so a 3840×2160
frame runs in memory bounded by the tile size (use it under `torch.no_grad()`; with
autograd every window's graph is kept).

Outputs match the untiled `fn` exactly wherever a pixel lies farther than `fn`'s receptive
field from every window edge inside the image, provided `fn` is local (convolutions,
per-position norms); GroupNorm statistics are per window, so there it is approximate.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Window starts covering [0, length): 0, stride, 2·stride, …, and length − tile last."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(size: int, overlap: int, left: bool, right: bool, like: torch.Tensor) -> torch.Tensor:
    """(size,) weights: rise linearly over `overlap` samples on each side with a neighbour."""
    w = torch.ones(size, dtype=like.dtype, device=like.device)
    if overlap > 0:
        r = (torch.arange(overlap, dtype=like.dtype, device=like.device) + 0.5) / overlap
        n = min(overlap, size)
        if left:
            w[:n] = torch.minimum(w[:n], r[:n])
        if right:
            w[size - n :] = torch.minimum(w[size - n :], r[:n].flip(0))
    return w


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: Fraction | int = 1,
    align: int = 1,
) -> torch.Tensor:
    """Blend `fn` over overlapping (tile × tile) windows of x's last two dims.

    tile, overlap: in x's units; both and every window start are multiples of `align`
    (so down-sampling and wavelet grids line up with the untiled run).
    """
    scale = Fraction(scale)
    if tile <= overlap or tile % align or overlap % align:
        raise ValueError(
            f"tiled: need tile > overlap >= 0, both multiples of {align}; "
            f"got tile={tile}, overlap={overlap}"
        )
    height, width = x.shape[-2:]
    if height % align or width % align:
        raise ValueError(f"tiled: input size {height}×{width} is not a multiple of {align}")
    stride = tile - overlap
    ys, xs = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    out = weight = None
    ov = int(overlap * scale)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            th, tw = min(tile, height), min(tile, width)
            y = fn(x[..., y0 : y0 + th, x0 : x0 + tw])
            oh, ow = int(th * scale), int(tw * scale)
            if y.shape[-2:] != (oh, ow):
                raise ValueError(
                    f"tiled: fn mapped a {th}×{tw} window to {tuple(y.shape)}, "
                    f"expected spatial size {oh}×{ow} (scale {scale})"
                )
            if out is None:
                full = (*y.shape[:-2], int(height * scale), int(width * scale))
                out = y.new_zeros(full)
                weight = y.new_zeros(full[-2:])
            wy = _ramp(oh, ov, i > 0, i < len(ys) - 1, y)
            wx = _ramp(ow, ov, j > 0, j < len(xs) - 1, y)
            w = wy[:, None] * wx[None, :]
            oy, ox = int(y0 * scale), int(x0 * scale)
            out[..., oy : oy + oh, ox : ox + ow] += y * w
            weight[oy : oy + oh, ox : ox + ow] += w
    return out / weight
