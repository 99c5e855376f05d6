"""Teacher alignment: student features vs. a frozen module's per-frame features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqcore.losses.recon import frames


@dataclass
class TeacherConfig:
    """Align student features to a frozen teacher's per-frame features (PVQ-VAE seed 004,
    sec. 3.4 aligns to FLUX's 2D VAE; here any module mapping (N, 3, H, W) in [-1, 1] to
    (N, C_t, h, w) or (N, C_t)). Teacher maps are average-pooled to the student's grid
    (T/t frames per latent frame, adaptive in space), then compared per position."""

    distance: str = "cosine"  # "cosine": 1 − cos along channels | "l2": mean squared error
    student_dim: int = 0  # C_s; needed with `projection`
    teacher_dim: int = 0  # C_t; needed with `projection`
    projection: bool = False  # learned linear C_s -> C_t on the student side (REPA-style)
    max_frames: int | None = None  # teacher sees ~this many frames (whole latent-frame groups)

    def validate(self) -> None:
        if self.distance not in ("cosine", "l2"):
            raise ValueError(f"teacher.distance must be 'cosine' or 'l2', got {self.distance!r}")
        if self.projection and (self.student_dim <= 0 or self.teacher_dim <= 0):
            raise ValueError("teacher.projection needs student_dim and teacher_dim > 0")


class TeacherAlignment(nn.Module):
    """Distance between (projected) student features and pooled frozen-teacher features."""

    def __init__(self, config: TeacherConfig, teacher: nn.Module):
        super().__init__()
        config.validate()
        self.config = config
        self.teacher = teacher.eval().requires_grad_(False)
        self.proj = (
            nn.Linear(config.student_dim, config.teacher_dim) if config.projection else None
        )

    def train(self, mode: bool = True) -> TeacherAlignment:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_features(
        self, x: torch.Tensor, grid: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher features of x pooled to `grid` ((h, w) or (t, h, w)): (B, C_t, *grid), or
        (B, C_t[, t]) for a teacher giving one vector per frame; plus the latent frames kept
        (None: all) when `max_frames` subsamples a clip."""
        if x.dim() == 4:
            f = self.teacher(x).float()
            return (f if f.dim() == 2 else F.adaptive_avg_pool2d(f, grid)), None
        b, t_in = x.shape[0], x.shape[2]
        t_out, kept = grid[0], None
        if t_in % t_out == 0 and self.config.max_frames is not None:
            group = t_in // t_out  # whole groups, so the temporal pooling stays aligned
            keep = max(1, min(t_out, self.config.max_frames // group))
            kept = torch.randperm(t_out)[:keep].sort().values.to(x.device)
            frame_idx = (kept[:, None] * group + torch.arange(group, device=x.device)).flatten()
            x, t_in, t_out = x.index_select(2, frame_idx), keep * group, keep
        f = self.teacher(frames(x)).float()  # (B·T, C_t, h', w') or (B·T, C_t)
        f = f.reshape(b, t_in, *f.shape[1:]).transpose(1, 2)  # (B, C_t, T, ...)
        if f.dim() == 3:
            return F.adaptive_avg_pool1d(f, t_out), kept
        return F.adaptive_avg_pool3d(f, (t_out, *grid[1:])), kept

    def forward(self, student: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """student: (B, C_s, [t,] h, w) features; x: the input images/clips. Scalar loss."""
        if student.dim() != x.dim():
            raise ValueError(f"student features {tuple(student.shape)} and input "
                             f"{tuple(x.shape)} must both be images or both be clips")
        target, kept = self.teacher_features(x, tuple(student.shape[2:]))
        s = student.float()
        if kept is not None:
            s = s.index_select(2, kept)
        if target.dim() < s.dim():  # one teacher vector per image/frame: pool the student
            s = s.mean(dim=tuple(range(target.dim(), s.dim())))
        s = s.movedim(1, -1)
        if self.proj is not None:
            s = self.proj(s)
        tgt = target.movedim(1, -1)
        if s.shape != tgt.shape:
            raise ValueError(f"student features {tuple(s.shape)} vs teacher {tuple(tgt.shape)} "
                             "(channel-last): set teacher.projection with the right dims")
        if self.config.distance == "cosine":
            return (1.0 - F.cosine_similarity(s, tgt, dim=-1)).mean()
        return F.mse_loss(s, tgt)
