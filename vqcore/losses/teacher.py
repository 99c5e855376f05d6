"""Teacher alignment: student features vs. a frozen module's per-frame features.

PVQ-VAE (seed 004, sec. 3.4) aligns its latents with a frozen 2D VAE (FLUX's) and calls the
term contrastive. Distances: "contrastive", InfoNCE over positions (Oord et al.,
arXiv:1807.03748, eq. 4: each student position must pick its own teacher position among the
batch's sampled positions); "cosine", 1 − cos per position (as REPA, arXiv:2410.06940);
"l2". The teacher is any frozen module (N, 3, H, W) -> (N, C_t, h, w) or (N, C_t);
`EncoderTeacher` makes one of a trained tokenizer's encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqcore.losses.recon import frames

DISTANCES = ("contrastive", "cosine", "l2")


@dataclass
class TeacherConfig:
    """Align student features to a frozen teacher's per-frame features (PVQ-VAE seed 004,
    sec. 3.4 aligns to FLUX's 2D VAE; here any module mapping (N, 3, H, W) in [-1, 1] to
    (N, C_t, h, w) or (N, C_t)). Teacher maps are average-pooled to the student's grid
    (T/t frames per latent frame, adaptive in space), then compared per position."""

    distance: str = "cosine"  # "contrastive" (InfoNCE) | "cosine": 1 − cos | "l2": MSE
    student_dim: int = 0  # C_s; needed with `projection`
    teacher_dim: int = 0  # C_t; needed with `projection`
    projection: bool = False  # learned linear C_s -> C_t on the student side (REPA-style)
    max_frames: int | None = None  # teacher sees ~this many frames (whole latent-frame groups)
    temperature: float = 0.07  # "contrastive": τ of the InfoNCE logits
    max_positions: int = 1024  # "contrastive": positions sampled a step (the logits are P×P)
    # where the frozen teacher comes from, read by the trainer (vqcore loads nothing): a vqtok
    # model (`vqtok` run folder, exported model, checkpoint or MLflow URI) whose encoder is used
    model: str | None = None

    def validate(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"teacher.distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.temperature <= 0 or self.max_positions < 2:
            raise ValueError("teacher.temperature must be > 0 and max_positions >= 2")
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
        if self.config.distance == "contrastive":
            return self._info_nce(s.reshape(-1, s.shape[-1]), tgt.reshape(-1, tgt.shape[-1]))
        if self.config.distance == "cosine":
            return (1.0 - F.cosine_similarity(s, tgt, dim=-1)).mean()
        return F.mse_loss(s, tgt)

    def _info_nce(self, s_pc: torch.Tensor, t_pc: torch.Tensor) -> torch.Tensor:
        """InfoNCE over up to `max_positions` positions sampled from the batch: position i's
        positive is the teacher's feature at i, its negatives the other sampled positions."""
        n = s_pc.shape[0]
        if n > self.config.max_positions:
            pick = torch.randperm(n, device=s_pc.device)[: self.config.max_positions]
            s_pc, t_pc = s_pc[pick], t_pc[pick]
        logits = F.normalize(s_pc, dim=-1) @ F.normalize(t_pc, dim=-1).t()
        target = torch.arange(s_pc.shape[0], device=s_pc.device)
        return F.cross_entropy(logits / self.config.temperature, target)


class EncoderTeacher(nn.Module):
    """A tokenizer's encoder as the teacher: images (N, 3, H, W) -> its continuous latents
    (N, C, h, w) (a video tokenizer encodes each image as a one-frame clip; T = 1 dropped)."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, x_nchw: torch.Tensor) -> torch.Tensor:
        z = self.tokenizer.encode(x_nchw)
        return z[:, :, 0] if z.dim() == 5 else z
