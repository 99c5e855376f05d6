"""GAN losses for D and G, VQGAN's adaptive generator weight, LeCam regularisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vqcore.ops import all_reduce_sum_
from vqcore.ops.dist import is_distributed


def d_hinge(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge D loss (Lim & Ye, arXiv:1705.02894; VQGAN): E[relu(1−D(x))] + E[relu(1+D(x̂))]."""
    return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()


def d_non_saturating(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Goodfellow et al. arXiv:1406.2661 eq. 1 with logits: E[softplus(−D(x))] + E[softplus(D(x̂))]."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def g_hinge(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge loss: −E[D(x̂)]."""
    return -logits_fake.float().mean()


def g_non_saturating(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss (arXiv:1406.2661 sec. 3): −E[log σ(D(x̂))] = E[softplus(−D(x̂))]."""
    return F.softplus(-logits_fake.float()).mean()


GAN_LOSSES: dict[str, tuple[Callable, Callable]] = {
    "hinge": (d_hinge, g_hinge),
    "non_saturating": (d_non_saturating, g_non_saturating),
}


def adaptive_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    delta: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """VQGAN's λ (Esser et al., arXiv:2012.09841, eq. 7), detached:
    λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_GAN‖ + δ), clamped to [0, max_weight],
    G_L = the decoder's last layer weight; L_rec is the reconstruction (+ perceptual) loss."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + delta)
    return weight.clamp(0.0, max_weight).detach()


class LeCam(nn.Module):
    """LeCam regularisation (Tseng et al., arXiv:2104.03310, eq. 3):
    R_LC = E_x[‖D(x) − α_F‖²] + E_x̂[‖D(x̂) − α_R‖²], with α_R, α_F exponential moving averages
    of D's mean outputs on real and fake data (decay γ = 0.99 in the paper). The EMAs are
    averaged over ranks, so every rank holds the same values."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"lecam decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        means = torch.stack([logits_real.float().mean(), logits_fake.float().mean()])
        if is_distributed():
            means = all_reduce_sum_(means) / torch.distributed.get_world_size()
        # the first batch starts the EMAs (weight 1: lerp gives `means` exactly), not 0; chosen
        # on the device, as reading `initialized` back would be a host sync every step
        weight = torch.where(self.initialized, 1.0 - self.decay, 1.0).float()
        self.ema_real.lerp_(means[0], weight)
        self.ema_fake.lerp_(means[1], weight)
        self.initialized.fill_(True)

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """R_LC with the current EMAs (call `update` first in a training step)."""
        return (logits_real.float() - self.ema_fake).square().mean() + (
            logits_fake.float() - self.ema_real
        ).square().mean()
