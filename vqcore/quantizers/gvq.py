"""`gvq`: Gumbel-softmax vector quantization (Jang, Gu & Poole, arXiv:1611.01144; as used by
DALL-E's dVAE, arXiv:2102.12092, and taming-transformers' GumbelQuantize).

A 1×1 projection maps each C-vector to K logits π; training draws a relaxed one-hot sample

    y = softmax((π + g) / τ),  g_k = -log(-log U_k),  U_k ~ U(0, 1)      (Jang et al. eq. 1-2)

and returns z_q = y · E (a convex mix of the K codebook rows). With `straight_through` the
sample is hard: forward one_hot(argmax y), backward the gradient of y (Jang et al. sec. 2.2,
"Straight-Through Gumbel-Softmax"). Eval is deterministic: code = argmax π, z_q = E[code].
Loss: kl_weight · KL(softmax(π) ‖ uniform(K)) = kl_weight · Σ_k q_k log(q_k K) (the dVAE
prior term; taming's `kl_weight`).

Temperature schedule (Jang et al. sec. 4, experimental setup): τ(t) = max(min_temperature,
temperature · exp(-anneal_rate · t)), t = the `step` buffer, advanced once per training forward
(never by `encode`/eval), saved with the state so a resume continues the schedule.
`anneal_rate = 0` keeps τ constant.

Shapes: z (B, C, *S) -> tokens (N, C) -> logits (N, K); codes (B, *S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vqcore.quantizers.base import Quantized, Quantizer, QuantizerConfig, from_tokens, to_tokens
from vqcore.quantizers.codebook import Codebook
from vqcore.quantizers.registry import register


@dataclass
class GVQConfig(QuantizerConfig):
    type: ClassVar[str] = "gvq"
    codebook_size: int = 512  # K
    temperature: float = 1.0  # τ at step 0
    min_temperature: float = 0.5  # floor of the schedule (Jang et al. use 0.5)
    anneal_rate: float = 1e-5  # r in τ(t) = max(τ_min, τ₀ exp(-r t)); 0 = constant τ
    straight_through: bool = False  # hard one-hot forward, relaxed gradient
    kl_weight: float = 5e-4  # weight of KL(q ‖ uniform) (taming GumbelQuantize default)

    def validate(self) -> None:
        super().validate()
        if self.codebook_size < 2:
            raise ValueError(f"gvq: codebook_size must be >= 2, got {self.codebook_size}")
        if not 0 < self.min_temperature <= self.temperature:
            raise ValueError(
                "gvq: need 0 < min_temperature <= temperature, got "
                f"{self.min_temperature} and {self.temperature}"
            )
        if self.anneal_rate < 0 or self.kl_weight < 0:
            raise ValueError("gvq: anneal_rate and kl_weight must be >= 0")


@register(GVQConfig)
class GumbelQuantizer(Quantizer):
    def __init__(self, config: GVQConfig):
        super().__init__(config)
        self.proj = nn.Linear(config.dim, config.codebook_size)  # the 1×1 conv to K logits
        self.codebook = Codebook(config.codebook_size, config.dim, owner="gvq")
        self.usage = self.codebook.usage
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def temperature_at(self, step: torch.Tensor) -> torch.Tensor:
        """τ(t) = max(τ_min, τ₀ · exp(-r t)) (Jang et al. sec. 4), on the device of `step`:
        the forward reads no step count back to the host."""
        c = self.config
        tau = c.temperature * torch.exp(-c.anneal_rate * step.double())
        return tau.clamp_min(c.min_temperature).float()

    @property
    def temperature(self) -> float:
        return float(self.temperature_at(self.step))

    def quantize(self, z: torch.Tensor) -> Quantized:
        x, spatial = to_tokens(z)
        logits = self.proj(x)  # π (N, K)
        embed = self.codebook.table[0]  # E (K, C)
        tau = self.temperature_at(self.step)
        if self.training:
            # eq. 1-2 (hard=True: straight-through Gumbel-softmax, sec. 2.2)
            y = F.gumbel_softmax(logits, tau=tau, hard=self.config.straight_through, dim=-1)
            codes = y.argmax(-1)
            x_q = y @ embed
            self.step += 1
        else:
            codes = logits.argmax(-1)
            x_q = self.codebook.lookup(codes)
        log_q = F.log_softmax(logits.float(), dim=-1)
        kl = (log_q.exp() * (log_q + math.log(self.config.codebook_size))).sum(-1).mean()
        hist = self.usage.update(codes, sync=self.training)
        metrics = {**self.usage.stats(hist), "kl": kl.detach(), "temperature": tau}
        return Quantized(
            from_tokens(x_q, spatial), codes.view(spatial), self.config.kl_weight * kl, metrics
        )

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return from_tokens(self.codebook.lookup(codes.reshape(-1)), codes.shape)
