"""`fsq`: finite scalar quantization (Mentzer et al., arXiv:2309.15505, sec. 3 and app. A.1).

Channel i of the d = len(levels) dims is bounded to L_i values and rounded:

    f(x)_i = ⌊L_i/2⌋' · tanh(x_i + s_i) - o_i      (sec. 3.1; o_i = 0.5 for even L_i, else 0,
                                                    s_i = tan(o_i / ⌊L_i/2⌋') so f(0) ≈ 0,
                                                    ⌊L_i/2⌋' = (L_i - 1)(1 - 1e-3)/2)
    ẑ_i = round_ste(f(x)_i) / ⌊L_i/2⌋              (round with a straight-through gradient)

giving the implicit codebook of K = Π L_i grid points in [-1, 1]^d. Code index by mixed radix
(app. A.1): digit_i = round(f(x)_i) + ⌊L_i/2⌋ ∈ [0, L_i), index = Σ_i digit_i Π_{j<i} L_j.
No auxiliary loss (a zero scalar); 1×1 projections map C -> d and back when dim != d.
Recommended levels (Table 1): 2^8 [8,6,5], 2^10 [8,5,5,5], 2^12 [7,5,5,5,5],
2^14 [8,8,8,6,5], 2^16 [8,8,8,5,5,5].

Shapes: z (B, C, *S) -> tokens (N, C) -> (N, d); codes (B, *S) int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from vqcore.quantizers.base import (
    CodeUsage,
    Quantized,
    Quantizer,
    QuantizerConfig,
    from_tokens,
    straight_through,
    to_tokens,
)
from vqcore.quantizers.registry import register

MAX_CODES = 1 << 24  # usage counters are per code


@dataclass
class FSQConfig(QuantizerConfig):
    type: ClassVar[str] = "fsq"
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # L_i; K = Π L_i = 1000

    def validate(self) -> None:
        super().validate()
        if not self.levels or any(int(n) != n or n < 2 for n in self.levels):
            raise ValueError(
                f"fsq: levels must be a non-empty list of ints >= 2, got {self.levels}"
            )
        if math.prod(self.levels) > MAX_CODES:
            raise ValueError(f"fsq: at most {MAX_CODES} codes, got levels {self.levels}")


@register(FSQConfig)
class FiniteScalarQuantizer(Quantizer):
    def __init__(self, config: FSQConfig):
        super().__init__(config)
        levels = torch.tensor([int(n) for n in config.levels])
        d = len(levels)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), levels[:-1]]), 0)
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", basis, persistent=False)  # Π_{j<i} L_j
        self.register_buffer("half_width", levels // 2, persistent=False)  # ⌊L_i/2⌋
        if d != config.dim:
            self.project_in, self.project_out = nn.Linear(config.dim, d), nn.Linear(d, config.dim)
        else:
            self.project_in = self.project_out = None
        self.usage = CodeUsage(math.prod(int(n) for n in config.levels))

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) of sec. 3.1: rounds to exactly L_i integers (even L_i: -L/2 .. L/2 - 1)."""
        half_l = (self.levels - 1) * (1 - 1e-3) / 2
        offset = (self.levels % 2 == 0).to(half_l.dtype) * 0.5
        shift = torch.tan(offset / half_l)  # as the paper's code (app. A.1); finite for L = 2
        return torch.tanh(x + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> Quantized:
        x, spatial = to_tokens(z)
        if self.project_in is not None:
            x = self.project_in(x)
        bounded = self.bound(x)
        rounded = torch.round(bounded)
        codes = ((rounded.long() + self.half_width) * self.basis).sum(-1)  # mixed radix
        x_q = straight_through(bounded, rounded) / self.half_width  # round_ste, normalised
        if self.project_out is not None:
            x_q = self.project_out(x_q)
        hist = self.usage.update(codes, sync=self.training)
        return Quantized(
            from_tokens(x_q, spatial), codes.view(spatial), z.new_zeros(()), CodeUsage.stats(hist)
        )

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes.reshape(-1, 1) // self.basis) % self.levels
        x = (digits - self.half_width).float() / self.half_width
        if self.project_out is not None:
            x = self.project_out(x)
        return from_tokens(x, codes.shape)
