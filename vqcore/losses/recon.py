"""Shared helpers and the reconstruction loss.

Argument order everywhere in `vqcore.losses` is (prediction, target) = (x_hat, x), as in
torch.nn losses. Images are (B, C, H, W), clips (B, C, T, H, W), channel-first in [-1, 1].
Reductions run in fp32 (PVQ-VAE seed 004, sec. 1.2). `frame_mask` (B, T) bool marks the real
(not zero-padded) frames of a clip.
"""

from __future__ import annotations

import warnings

import torch

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One warning per process and reason (not one per step or per module built)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> itself; (B, C, T, H, W) -> (B·T, C, H, W), frame-major per clip."""
    if x.dim() == 4:
        return x
    if x.dim() == 5:
        return x.transpose(1, 2).flatten(0, 1)
    raise ValueError(f"expected (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")


def check_pair(x_hat: torch.Tensor, x: torch.Tensor) -> None:
    if x_hat.shape != x.shape:
        raise ValueError(f"prediction {tuple(x_hat.shape)} and target {tuple(x.shape)} differ")
    if x.dim() not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")


def reconstruction_loss(
    x_hat: torch.Tensor, x: torch.Tensor, kind: str = "l1", frame_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean |x̂−x| ("l1") or (x̂−x)² ("l2") in fp32, over valid frames only when masked."""
    check_pair(x_hat, x)
    diff = x_hat.float() - x.float()
    if kind == "l1":
        err = diff.abs()
    elif kind == "l2":
        err = diff.square()
    else:
        raise ValueError(f"reconstruction kind must be 'l1' or 'l2', got {kind!r}")
    if frame_mask is None:
        return err.mean()
    if x.dim() != 5 or frame_mask.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"frame_mask must be (B, T) for clips {tuple(x.shape)}")
    m = frame_mask.to(err.dtype)[:, None, :, None, None]
    per_frame = x.shape[1] * x.shape[3] * x.shape[4]  # C·H·W values in one frame
    return (err * m).sum() / (m.sum() * per_frame).clamp_min(1)
