"""The combination the trainer calls: recon + quantizer + perceptual + GAN (+ teacher) for G,
GAN (+ LeCam) for D; every term named in a dict so the trainer logs all of them."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from vqcore.losses.gan import GAN_LOSSES, LeCam, adaptive_weight
from vqcore.losses.perceptual import Perceptual, PerceptualConfig
from vqcore.losses.recon import check_pair, frames, reconstruction_loss
from vqcore.losses.teacher import TeacherAlignment, TeacherConfig


@dataclass
class TokenizerLossConfig:
    """Weights of every term; a weight of 0 switches its term off (and skips its compute)."""

    recon: str = "l1"  # "l1" | "l2"
    recon_weight: float = 1.0
    quantizer_weight: float = 1.0  # on the quantizer's own (already weighted) loss
    perceptual_weight: float = 1.0
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    gan: str = "hinge"  # "hinge" | "non_saturating"
    gan_weight: float = 0.1  # VQGAN's disc_weight, times the adaptive λ
    adaptive_weight: bool = True  # VQGAN eq. 7; off: λ = 1 (e.g. where the last layer is sharded)
    adaptive_delta: float = 1e-4
    adaptive_max: float = 1e4
    disc_start: int = 0  # step from which the GAN terms (G and D) are on
    lecam_weight: float = 0.0  # Tseng et al. use 0.1–0.3 for limited data
    lecam_decay: float = 0.99
    teacher_weight: float = 0.0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    @classmethod
    def debug(cls) -> TokenizerLossConfig:
        return cls(perceptual_weight=0.0, gan_weight=0.1, disc_start=0)

    def validate(self) -> None:
        if self.recon not in ("l1", "l2"):
            raise ValueError(f"loss.recon must be 'l1' or 'l2', got {self.recon!r}")
        if self.gan not in GAN_LOSSES:
            raise ValueError(f"loss.gan must be one of {sorted(GAN_LOSSES)}, got {self.gan!r}")
        for name in ("recon_weight", "quantizer_weight", "perceptual_weight", "gan_weight",
                     "lecam_weight", "teacher_weight", "adaptive_delta", "adaptive_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start < 0:
            raise ValueError("loss.disc_start must be >= 0")
        self.perceptual.validate()
        if self.teacher_weight > 0:
            self.teacher.validate()


@dataclass
class LossOutput:
    """`total` carries the gradient; `terms` are detached fp32 scalars to log."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


@contextmanager
def _frozen(module: nn.Module):
    """No parameter gradients inside (G step through D): grads flow only to the input."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def disc_logits(disc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """D(x); clips are folded into frames for a 2D discriminator (`input_ndim == 4`)."""
    if getattr(disc, "input_ndim", x.dim()) == 4 and x.dim() == 5:
        x = frames(x)
    return disc(x)


class TokenizerLoss(nn.Module):
    """recon + quantizer + perceptual + GAN (+ teacher) for G; GAN (+ LeCam) for D."""

    def __init__(self, config: TokenizerLossConfig | None = None, teacher: nn.Module | None = None):
        super().__init__()
        config = config or TokenizerLossConfig()
        config.validate()
        self.config = config
        self.perceptual = Perceptual(config.perceptual) if config.perceptual_weight > 0 else None
        self.d_loss_fn, self.g_loss_fn = GAN_LOSSES[config.gan]
        self.lecam = LeCam(config.lecam_decay) if config.lecam_weight > 0 else None
        self.teacher = None
        if config.teacher_weight > 0:
            if teacher is None:
                raise ValueError("loss.teacher_weight > 0 needs a teacher module")
            self.teacher = TeacherAlignment(config.teacher, teacher)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the generator's optimiser must also step (the teacher projection)."""
        return [] if self.teacher is None or self.teacher.proj is None else list(
            self.teacher.proj.parameters())

    def disc_active(self, step: int) -> bool:
        return self.config.gan_weight > 0 and step >= self.config.disc_start

    def generator(
        self, x_hat: torch.Tensor, x: torch.Tensor, quant_loss: torch.Tensor | None, step: int,
        disc: nn.Module | None = None, last_layer: torch.Tensor | None = None,
        student_features: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """The generator's loss. quant_loss: `Quantized.loss` (or None); step: the global
        optimiser step (for `disc_start`); disc: the discriminator, judged frozen (gradients
        reach x_hat only); last_layer: the decoder's last weight, for VQGAN's λ (eq. 7; λ = 1
        without it or under no_grad); student_features: the tokenizer features to align
        (needed iff teacher_weight > 0); frame_mask (B, T): real frames of padded clips.
        Terms: recon_<kind>, quantizer, perceptual, g_gan, adaptive_weight, disc_factor,
        teacher, total (only those switched on)."""
        c = self.config
        terms: dict[str, torch.Tensor] = {}
        recon = reconstruction_loss(x_hat, x, c.recon, frame_mask)
        terms[f"recon_{c.recon}"] = recon
        nll = c.recon_weight * recon  # L_rec of VQGAN eq. 7 (recon + perceptual)
        if self.perceptual is not None and self.perceptual.available:
            p = self.perceptual(x_hat, x, frame_mask)
            terms["perceptual"] = p
            nll = nll + c.perceptual_weight * p
        total = nll
        if quant_loss is not None:
            terms["quantizer"] = quant_loss.float()
            total = total + c.quantizer_weight * quant_loss.float()
        if disc is not None and self.disc_active(step):
            with _frozen(disc):
                g_loss = self.g_loss_fn(disc_logits(disc, x_hat))
            lam = torch.ones((), device=x.device)
            if c.adaptive_weight and last_layer is not None and torch.is_grad_enabled():
                lam = adaptive_weight(nll, g_loss, last_layer, c.adaptive_delta, c.adaptive_max)
            terms["g_gan"], terms["adaptive_weight"] = g_loss, lam
            total = total + c.gan_weight * lam * g_loss
        terms["disc_factor"] = x.new_tensor(float(disc is not None and self.disc_active(step)))
        if self.teacher is not None:
            if student_features is None:
                raise ValueError("loss.teacher_weight > 0: pass student_features to generator()")
            t = self.teacher(student_features, x)
            terms["teacher"] = t
            total = total + c.teacher_weight * t
        terms["total"] = total
        return LossOutput(total, {k: v.detach().float() for k, v in terms.items()})

    def discriminator(
        self, x_hat: torch.Tensor, x: torch.Tensor, step: int, disc: nn.Module
    ) -> LossOutput:
        """D loss on real x and (detached) x̂, one forward over both so BatchNorm sees both.
        Terms: d_gan, logits_real, logits_fake, lecam, d_total. Before `disc_start` the total
        is a constant 0 with no graph: check `disc_active(step)` and skip the D step."""
        check_pair(x_hat, x)
        if not self.disc_active(step):
            zero = x.new_zeros((), dtype=torch.float32)
            return LossOutput(zero, {"d_total": zero})
        logits = disc_logits(disc, torch.cat([x, x_hat.detach()]))
        real, fake = logits.chunk(2)
        d_loss = self.d_loss_fn(real, fake)
        terms = {"d_gan": d_loss, "logits_real": real.float().mean(),
                 "logits_fake": fake.float().mean()}
        total = d_loss
        if self.lecam is not None:
            self.lecam.update(real, fake)
            reg = self.lecam(real, fake)
            terms["lecam"] = reg
            total = total + self.config.lecam_weight * reg
        terms["d_total"] = total
        return LossOutput(total, {k: v.detach().float() for k, v in terms.items()})
