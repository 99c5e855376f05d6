"""The per-batch (resolution, frame count) draw, clip windows, crops and padding.

Recipe from PVQ-VAE (seed `004_ff189c618a3d248c.txt`, section 1.1): one of ten resolutions
is drawn uniformly at every step, and clips are truncated or zero-padded to one of
{16, 32, 48, 96} consecutive frames. Here one `(resolution, frames)` pair is drawn uniformly
from the product of the configured sets per batch, so every batch has one fixed shape.

Shapes: `out_hw = (H, W)`. Clips are built channel-last, uint8 `(T, H, W, 3)` as decoders
give them, and batches become channel-first `(B, 3, T, H, W)` views (`stream.channels_first`).
Resolutions are `(height, width)` pairs (the seed writes them as W×H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The seed's ten resolutions as (H, W): 256², 512², 768×512, 1024×512, 1024², 1024×2048,
# 2048², 720p, 1080p, 4K (W×H in the paper).
SEED_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (256, 256),
    (512, 512),
    (512, 768),
    (512, 1024),
    (1024, 1024),
    (2048, 1024),
    (2048, 2048),
    (720, 1280),
    (1080, 1920),
    (2160, 3840),
)
SEED_FRAME_COUNTS: tuple[int, ...] = (16, 32, 48, 96)


@dataclass(frozen=True)
class BatchSpec:
    """The shape of one batch: `(batch_size, 3, num_frames, height, width)` uint8."""

    height: int
    width: int
    num_frames: int
    batch_size: int


def sample_bytes(height: int, width: int, num_frames: int) -> int:
    """Bytes of one uint8 sample `(3, T, H, W)`."""
    return 3 * num_frames * height * width


def batch_size_for(height: int, width: int, num_frames: int, max_batch: int, budget: int) -> int:
    """Memory rule: `B = clamp(budget // (3·T·H·W), 1, max_batch)`.

    A batch's uint8 output never exceeds `budget` bytes unless one sample alone does;
    `DataConfig` rejects sets where a single sample of the largest pair exceeds it.
    """
    return max(1, min(max_batch, budget // sample_bytes(height, width, num_frames)))


def draw_spec(
    rng: np.random.Generator,
    resolutions: tuple[tuple[int, int], ...] = SEED_RESOLUTIONS,
    frame_counts: tuple[int, ...] = SEED_FRAME_COUNTS,
    max_batch: int = 8,
    budget: int = 3 << 30,
) -> BatchSpec:
    """Draw one (resolution, frame count) pair uniformly from the product of the two sets."""
    pair = int(rng.integers(len(resolutions) * len(frame_counts)))
    (h, w), t = resolutions[pair // len(frame_counts)], frame_counts[pair % len(frame_counts)]
    return BatchSpec(h, w, t, batch_size_for(h, w, t, max_batch, budget))


def frame_window(rng: np.random.Generator | None, total: int, num_frames: int, stride: int = 1):
    """Frame indices of a clip: random start (the first frame when `rng` is None), `stride`
    apart, at most `num_frames` long.

    A clip shorter than the window starts at 0 and keeps every frame it has (the caller
    zero-pads; the number of real frames is `len(result)`).
    """
    span = (num_frames - 1) * stride + 1
    start = int(rng.integers(total - span + 1)) if total >= span and rng is not None else 0
    return np.arange(start, min(total, start + span), stride, dtype=np.int64)[:num_frames]


def crop_box(
    rng: np.random.Generator | None,
    src_hw: tuple[int, int],
    out_hw: tuple[int, int],
    scale: tuple[float, float] = (1.0, 1.0),
) -> tuple[float, float, float, float]:
    """Random-resized crop `(top, left, h, w)` in source pixels with the target's aspect.

    The crop is the largest box of aspect `W/H` that fits the source, shrunk to an area
    fraction drawn uniformly from `scale`, at a uniformly random position. Without `rng`:
    the whole largest box, centred (tokenize, eval).
    """
    h0, w0 = src_hw
    aspect = out_hw[1] / out_hw[0]
    bh, bw = (h0, h0 * aspect) if w0 / h0 > aspect else (w0 / aspect, w0)
    if rng is None:
        return (h0 - bh) / 2, (w0 - bw) / 2, bh, bw
    s = math.sqrt(rng.uniform(*scale)) if scale[0] < scale[1] else math.sqrt(scale[0])
    bh, bw = bh * s, bw * s
    top, left = rng.uniform(0, h0 - bh), rng.uniform(0, w0 - bw)
    return top, left, bh, bw


def decode_plan(
    src_hw: tuple[int, int],
    box: tuple[float, float, float, float],
    out_hw: tuple[int, int],
    max_decode_side: int,
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Decode size and the integer crop box in decoded pixels.

    Frames are decoded (scaled by the decoder, down or up) at the scale that makes the crop
    the output size, so the crop is a plain slice and nothing is resized after the decoder
    (no second resampling, and no torch in the decode workers); only where that scale would
    make the longer side exceed `max_decode_side` is the frame decoded at that bound and
    the crop resized after (`crop_resize`).
    """
    h0, w0 = src_hw
    top, left, bh, bw = box
    f = min(max(out_hw[0] / bh, out_hw[1] / bw), max_decode_side / max(h0, w0))
    dh, dw = max(1, round(h0 * f)), max(1, round(w0 * f))
    sy, sx = dh / h0, dw / w0
    ch, cw = max(1, min(dh, round(bh * sy))), max(1, min(dw, round(bw * sx)))
    near = abs(ch - out_hw[0]) <= 1 and abs(cw - out_hw[1]) <= 1
    if near and dh >= out_hw[0] and dw >= out_hw[1]:
        ch, cw = out_hw  # the box rounds to the output size: take exactly that slice
    return (dh, dw), (
        max(0, min(dh - ch, round(top * sy))),
        max(0, min(dw - cw, round(left * sx))),
        ch,
        cw,
    )


def crop_resize(
    frames_thwc: np.ndarray,
    box: tuple[int, int, int, int],
    out_hw: tuple[int, int],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Crop `box=(top, left, h, w)` from uint8 `(t, H0, W0, 3)` frames and resize
    (bilinear, antialiased, in uint8) to `out_hw`; returns uint8 `(t, H, W, 3)`.

    With `out` (a zeroed uint8 `(T, H, W, 3)` slot of a batch, T >= t) the clip is written
    into `out[:t]` and the rest stays zero padding: one plain copy, no transpose."""
    top, left, h, w = box
    x = np.asarray(frames_thwc)[:, top : top + h, left : left + w]
    if (h, w) != tuple(out_hw):
        import torch  # only here: decode workers slice decoder-sized frames (`decode_plan`)
        import torch.nn.functional as F

        xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # channels-last
        x = F.interpolate(xt, size=tuple(out_hw), mode="bilinear", antialias=True)
        x = x.permute(0, 2, 3, 1).numpy()  # back to (t, H, W, 3), no copy
    if out is None:
        return np.ascontiguousarray(x)
    out[: x.shape[0]] = x
    return out[: x.shape[0]]
