"""`vq`: vector quantization with one codebook (VQ-VAE, arXiv:1711.00937).

Codebook learned by gradient or EMA, l2 or cosine distance (ViT-VQGAN, arXiv:2110.04627,
sec. 3.2), optional CVQ-VAE re-anchoring of under-used codes (arXiv:2307.15139); see
`codebook.py` for the update rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vqcore.quantizers.base import (
    Quantized,
    Quantizer,
    QuantizerConfig,
    from_tokens,
    straight_through,
    to_tokens,
)
from vqcore.quantizers.codebook import Codebook
from vqcore.quantizers.registry import register


@dataclass
class VQConfig(QuantizerConfig):
    type: ClassVar[str] = "vq"
    codebook_size: int = 512
    beta: float = 0.25  # commitment weight β (VQ-VAE eq. 3)
    update: str = "grad"  # "grad" | "ema"
    ema_decay: float = 0.99
    distance: str = "l2"  # "l2" | "cosine"
    cvq: bool = False  # CVQ-VAE online re-anchoring of dead codes
    cvq_anchor: str = "closest"  # "closest" | "random"
    cvq_decay: float = 0.99

    def validate(self) -> None:
        super().validate()
        if self.codebook_size < 2:
            raise ValueError(f"{self.type}: codebook_size must be >= 2, got {self.codebook_size}")
        if not 0 < self.ema_decay < 1 or not 0 < self.cvq_decay < 1:
            raise ValueError(f"{self.type}: ema_decay and cvq_decay must lie in (0, 1)")

    def codebook_kwargs(self) -> dict:
        """The Codebook arguments, shared by every quantizer built from vq settings."""
        return dict(
            beta=self.beta,
            update=self.update,
            ema_decay=self.ema_decay,
            distance=self.distance,
            cvq=self.cvq,
            cvq_anchor=self.cvq_anchor,
            cvq_decay=self.cvq_decay,
        )


@register(VQConfig)
class VectorQuantizer(Quantizer):
    def __init__(self, config: VQConfig):
        super().__init__(config)
        self.codebook = Codebook(
            config.codebook_size, config.dim, owner="vq", **config.codebook_kwargs()
        )
        self.usage = self.codebook.usage

    def quantize(self, z: torch.Tensor) -> Quantized:
        x, spatial = to_tokens(z)
        e, codes, loss, hist = self.codebook(x)
        x_in = torch.nn.functional.normalize(x, dim=-1) if self.config.distance == "cosine" else x
        z_q = from_tokens(straight_through(x_in, e), spatial)
        return Quantized(z_q, codes.view(spatial), loss, self.usage.stats(hist))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return from_tokens(self.codebook.lookup(codes.reshape(-1)), codes.shape)
