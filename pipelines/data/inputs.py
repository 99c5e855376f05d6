"""From data batches to model inputs: the conversions the trainer and evaluator share."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast for the model's forward (training, evaluation, inference); a no-op
    context in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def to_model_input(video_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, C, T, H, W) -> float32 in [-1, 1] on the device (conversion on the trainer).

    The data path hands a channels-last view (no transpose on the CPU); the dense layout is
    made here, on the device, in the same copy as the dtype change."""
    x = video_u8.to(device, non_blocking=True)
    return x.to(dtype=torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def fold_frames(x_bcthw: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B·T, C, H, W): image models see every frame as an image."""
    b, c, t, h, w = x_bcthw.shape
    return x_bcthw.transpose(1, 2).reshape(b * t, c, h, w)


def unfold_frames(x_bchw: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of `fold_frames`."""
    bt, c, h, w = x_bchw.shape
    return x_bchw.reshape(bt // t, t, c, h, w).transpose(1, 2)


def frame_mask(num_frames: torch.Tensor, t: int) -> torch.Tensor:
    """(B,) real-frame counts -> (B, T) bool mask of real (not zero-padded) frames."""
    return torch.arange(t)[None, :] < num_frames.reshape(-1, 1).cpu()
