"""HFSVQ: hierarchical VQ with residuals for frequency-specific embedding (seed 000).

F_L = (E_L, Q_L, D_L) reconstructs a low-frequency image X̂_l; F_H = (E_H, Q_H, D_H) encodes
the residual X_r = X − X̂_l with a product quantizer (S subspaces × K_s codes, defaults 4 × 16,
seed 000 supp. sec. 2.2-3); the output is X̂_l + X̂_r. Both are `ImageTokenizer`s.

Training alternates (seed 000 supp., Algorithm 1), one optimizer per part:

    opt_l = Adam(model.low_step_parameters());  opt_h = Adam(model.high_step_parameters())
    for x in batches:
        step = model.low_loss(x);  opt_l.zero_grad(); step.loss.backward(); opt_l.step()
        step = model.high_loss(x); opt_h.zero_grad(); step.loss.backward(); opt_h.step()

`step.loss` is the seed's eq. 9 (F_L) / eq. 10 (F_H): MSE reconstruction + the quantizer's
own terms; `step.x_hat` is the full reconstruction (X̂_l, or X̂_l + X̂_r) so a trainer may add
perceptual/GAN terms on it. In the F_H step F_L is frozen: it runs in eval mode under
`no_grad`, with no codebook update and no usage count (Algorithm 1 says "Freeze F_H" on
line 1, a typo for F_L: it then computes X̂_l with the frozen model).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqcore.models.config import TokenizerConfig
from vqcore.models.image_tokenizer import ImageTokenizerConfig
from vqcore.quantizers import Quantized

# The product quantizer of F_H: S = 4 subspaces × K_s = 16 codes (seed 000 supp. sec. 3).
PQ_DEFAULT = {"type": "pq", "num_subspaces": 4, "codebook_size": 16}


def _low_default() -> ImageTokenizerConfig:
    """F_L: coarser (×8) so it keeps the low frequencies."""
    return ImageTokenizerConfig(
        channel_mult=(1, 1, 2, 2), downsample=8, quantizer={"type": "vq", "codebook_size": 512}
    )


def _high_default() -> ImageTokenizerConfig:
    return ImageTokenizerConfig(downsample=4, quantizer=dict(PQ_DEFAULT))


@dataclass
class HFSVQConfig(TokenizerConfig):
    """F_L, an image tokenizer, and F_H, one on the residual X − X̂_l; a training step
    updates F_L and then F_H (`step_parts`)."""

    name = "hfsvq"
    step_parts = ("low", "high")

    low: ImageTokenizerConfig = field(default_factory=_low_default)  # F_L
    high: ImageTokenizerConfig = field(default_factory=_high_default)  # F_H on X − X̂_l

    def __post_init__(self) -> None:
        for key in ("low", "high"):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, ImageTokenizerConfig.from_dict(value))
            elif not isinstance(value, ImageTokenizerConfig):
                raise ValueError(f"hfsvq: {key} must be an image_tokenizer config, got {value!r}")
        if self.low.in_channels != self.high.in_channels:
            raise ValueError(
                f"hfsvq: low and high in_channels differ "
                f"({self.low.in_channels} vs {self.high.in_channels})"
            )

    def quantizer_specs(self) -> dict[str, dict[str, Any]]:
        return {"F_L": self.low.quantizer_config(), "F_H": self.high.quantizer_config()}

    def build(self) -> HFSVQ:
        return HFSVQ(self)


@dataclass
class HFSVQStep:
    """One alternating step's result: `loss` to backpropagate (eq. 9 or 10), the full
    reconstruction `x_hat`, the stepped part's `quantized`, and detached `metrics`."""

    loss: torch.Tensor
    x_hat: torch.Tensor
    quantized: Quantized
    metrics: dict[str, torch.Tensor]


def _metrics(prefix: str, recon: torch.Tensor, q: Quantized) -> dict[str, torch.Tensor]:
    out = {f"{prefix}/{k}": v.detach() for k, v in q.metrics.items()}
    out[f"{prefix}/mse"] = recon.detach()
    out[f"{prefix}/quantizer_loss"] = q.loss.detach()
    return out


class HFSVQ(nn.Module):
    def __init__(self, config: HFSVQConfig):
        super().__init__()
        self.config = config
        self.low = config.low.build()  # F_L
        self.high = config.high.build()  # F_H

    # -- Algorithm 1 (seed 000 supp.)
    def low_step_parameters(self) -> Iterator[nn.Parameter]:
        return self.low.parameters()

    def high_step_parameters(self) -> Iterator[nn.Parameter]:
        return self.high.parameters()

    # -- the parts one step updates in turn (TokenizerConfig.step_parts)
    def part_parameters(self, part: str) -> Iterator[nn.Parameter]:
        return getattr(self, f"{part}_step_parameters")()

    def part_loss(self, part: str, x_bchw: torch.Tensor) -> HFSVQStep:
        return getattr(self, f"{part}_loss")(x_bchw)

    def low_loss(self, x_bchw: torch.Tensor) -> HFSVQStep:
        """F_L step, eq. 9: ||X − D_L(Q_L(E_L(X)))||² + Q_L's loss. Touches only F_L."""
        x_low, q = self.low(x_bchw)
        recon = F.mse_loss(x_low.float(), x_bchw.float())
        return HFSVQStep(recon + q.loss, x_low, q, _metrics("low", recon, q))

    @torch.no_grad()
    def low_frozen(self, x_bchw: torch.Tensor) -> torch.Tensor:
        """X̂_l from a frozen F_L: eval mode, no grad, no codebook update, no usage count."""
        was_training = self.low.training
        self.low.eval()
        try:
            return self.low.detokenize(self.low.tokenize(x_bchw), x_bchw.shape[-2:])
        finally:
            self.low.train(was_training)

    def high_loss(self, x_bchw: torch.Tensor) -> HFSVQStep:
        """F_H step, eq. 10: ||X_r − D_H(Q_H(E_H(X_r)))||² + Q_H's loss, X_r = X − X̂_l with F_L
        frozen. Gradients reach only F_H."""
        x_low = self.low_frozen(x_bchw)
        x_res = x_bchw - x_low
        x_res_hat, q = self.high(x_res)
        recon = F.mse_loss(x_res_hat.float(), x_res.float())
        return HFSVQStep(recon + q.loss, x_low + x_res_hat, q, _metrics("high", recon, q))

    # -- the tokenizer interface
    def forward(self, x_bchw: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        """(X̂_l + X̂_r, Quantized) with z_q and codes the pairs (low, high), loss the sum of
        both quantizers' terms and metrics prefixed `low/`, `high/`. F_H sees X − sg[X̂_l]."""
        x_low, q_low = self.low(x_bchw)
        x_res_hat, q_high = self.high(x_bchw - x_low.detach())
        metrics = {f"low/{k}": v for k, v in q_low.metrics.items()}
        metrics |= {f"high/{k}": v for k, v in q_high.metrics.items()}
        q = Quantized(
            z_q=(q_low.z_q, q_high.z_q),
            codes=(q_low.codes, q_high.codes),
            loss=q_low.loss + q_high.loss,
            metrics=metrics,
        )
        return x_low + x_res_hat, q

    @torch.no_grad()
    def tokenize(self, x_bchw: torch.Tensor) -> tuple[Any, Any]:
        codes_low = self.low.tokenize(x_bchw)
        x_low = self.low.detokenize(codes_low, x_bchw.shape[-2:])
        return codes_low, self.high.tokenize(x_bchw - x_low)

    @torch.no_grad()
    def detokenize(self, codes: tuple[Any, Any], size: tuple[int, int] | None = None):
        """Images from (codes_low, codes_high); without `size`, both parts are cropped to
        the smaller of their padded sizes."""
        x_low = self.low.detokenize(codes[0], size)
        x_res = self.high.detokenize(codes[1], size)
        h, w = min(x_low.shape[-2], x_res.shape[-2]), min(x_low.shape[-1], x_res.shape[-1])
        return x_low[..., :h, :w] + x_res[..., :h, :w]


def _debug() -> HFSVQConfig:
    low = ImageTokenizerConfig.from_dict(
        {"flavour": "vqvae_debug", "downsample": 4, "channel_mult": (1, 2, 2)}
    )
    high = ImageTokenizerConfig.from_dict({"flavour": "pq_vae_debug", "quantizer": PQ_DEFAULT})
    return HFSVQConfig(low=low, high=high)


FLAVOURS: dict[str, HFSVQConfig] = {"default": HFSVQConfig(), "debug": _debug()}
HFSVQConfig.flavours = FLAVOURS
