"""Tokenizer losses: reconstruction, LPIPS, GAN (+ adaptive weight, LeCam), teacher alignment.

One concept per module; everything is re-exported here, so `from vqcore.losses import X`.
Argument order is (prediction, target) = (x_hat, x), as in torch.nn losses; images
(B, C, H, W), clips (B, C, T, H, W), channel-first in [-1, 1]; reductions in fp32.

    loss_fn = TokenizerLoss(TokenizerLossConfig(...), teacher=None)
    g = loss_fn.generator(x_hat, x, quant_loss, step, disc=D, last_layer=dec_last.weight)
    g.total.backward()                                   # g.terms: detached, for logging
    if loss_fn.disc_active(step):
        d = loss_fn.discriminator(x_hat.detach(), x, step, disc=D); d.total.backward()
"""

from vqcore.losses.gan import (
    GAN_LOSSES,
    LeCam,
    adaptive_weight,
    d_hinge,
    d_non_saturating,
    g_hinge,
    g_non_saturating,
)
from vqcore.losses.perceptual import BACKBONE_FILES, Perceptual, PerceptualConfig, find_backbone
from vqcore.losses.recon import check_pair, frames, reconstruction_loss, warn_once
from vqcore.losses.teacher import EncoderTeacher, TeacherAlignment, TeacherConfig
from vqcore.losses.tokenizer import (
    LossOutput,
    TokenizerLoss,
    TokenizerLossConfig,
    disc_logits,
)

__all__ = [
    "BACKBONE_FILES",
    "GAN_LOSSES",
    "LeCam",
    "LossOutput",
    "Perceptual",
    "PerceptualConfig",
    "EncoderTeacher",
    "TeacherAlignment",
    "TeacherConfig",
    "TokenizerLoss",
    "TokenizerLossConfig",
    "adaptive_weight",
    "check_pair",
    "d_hinge",
    "d_non_saturating",
    "disc_logits",
    "find_backbone",
    "frames",
    "g_hinge",
    "g_non_saturating",
    "reconstruction_loss",
    "warn_once",
]
