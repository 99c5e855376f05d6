"""Trivial reconstructions a tokenizer must beat, scored on the same frames as the model.

- `mean_colour`: every real frame of a clip replaced by the clip's mean colour (per channel).
  Any model below it has learned nothing about the content.
- `bicubic(x, f)`: each frame down-sampled by f per side (bicubic, antialiased) and back up:
  it keeps 1/f² of the values, so at f = 2, 4, 8, 16 it is a codec of compression ratio
  4, 16, 64, 256 (8-bit values in, 8-bit values kept). A tokenizer at ratio r is compared
  with the bicubic at the smallest f² >= r (keeps no more values than the tokenizer):
  `rate_factors(r)`.

Shapes: frames (N, C, H, W) in the data range; `mean_colour` takes clips (B, C, T, H, W)
with a (B, T) mask of real frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BICUBIC_FACTORS = (2, 4, 8, 16)  # per side; compression ratios 4, 16, 64, 256


def mean_colour(x_bcthw: torch.Tensor, mask_bt: torch.Tensor | None = None) -> torch.Tensor:
    """Each clip's mean colour over its real frames, broadcast to the clip's shape."""
    if mask_bt is None:
        mask_bt = torch.ones(x_bcthw.shape[0], x_bcthw.shape[2], dtype=torch.bool)
    m = mask_bt.to(x_bcthw.device, x_bcthw.dtype)[:, None, :, None, None]
    hw = x_bcthw.shape[-1] * x_bcthw.shape[-2]
    mean = (x_bcthw * m).sum(dim=(2, 3, 4), keepdim=True) / (m.sum(dim=2, keepdim=True) * hw)
    return mean.expand_as(x_bcthw)


def bicubic(frames_nchw: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic down by `factor` per side (antialiased, as PIL's resize) and back up."""
    h, w = frames_nchw.shape[-2:]
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    x = frames_nchw.float()
    down = F.interpolate(x, size=small, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(down, size=(h, w), mode="bicubic", align_corners=False).to(x.dtype)


def usable_factors(height: int, width: int) -> tuple[int, ...]:
    """Factors that leave at least 2 pixels per side."""
    return tuple(f for f in BICUBIC_FACTORS if min(height, width) >= 2 * f)


def rate_factors(compression_ratio: float) -> tuple[int | None, int | None]:
    """(f_at, f_richer): the bicubic factors whose ratio f² is the smallest >= the tokenizer's
    (keeps no more values: the one to beat) and the largest < it (keeps more)."""
    at = [f for f in BICUBIC_FACTORS if f * f >= compression_ratio * (1 - 1e-9)]
    richer = [f for f in BICUBIC_FACTORS if f * f < compression_ratio * (1 - 1e-9)]
    return (min(at) if at else None), (max(richer) if richer else None)

