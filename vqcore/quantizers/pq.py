"""`pq`: product quantization (Jégou, Douze & Schmid, "Product quantization for nearest
neighbor search", TPAMI 2011, sec. II-B; LooC seed 001, eq. 2).

Each C-vector is split into m = `num_subspaces` sub-vectors of d = C/m dims, and sub-vector j
is quantized by its OWN codebook C_j of K codes (Codebook with G = m, group = j):

    q(x) = (q_1(u_1(x)), ..., q_m(u_m(x))),   C = C_1 × ... × C_m   (K^m composite codes)

so one position costs m·log2 K bits. HFSVQ (seed 000) quantizes its residual branch F_H with
S subspaces of K_s = 16 codes each: `{"type": "pq", "num_subspaces": S, "codebook_size": 16}`.
Learning rules (grad / EMA, CVQ re-anchoring per sub-codebook) are Codebook's.

Shapes: z (B, C, *S) -> tokens (N, C) -> sub-vectors (N·m, d), row n·m + j = sub-vector j of
token n; codes (B, m, *S), codes[:, j] indexes codebook j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vqcore.quantizers.base import (
    Quantized,
    Quantizer,
    from_tokens,
    straight_through,
    to_tokens,
)
from vqcore.quantizers.codebook import Codebook
from vqcore.quantizers.registry import register
from vqcore.quantizers.vq import VQConfig


@dataclass
class PQConfig(VQConfig):
    """Product quantizer; the learning-rule fields (beta, update, ema_decay, distance, cvq, ...)
    are VQConfig's and apply to every sub-codebook."""

    type: ClassVar[str] = "pq"
    codebook_size: int = 16  # K codes per sub-codebook (HFSVQ's K_s = 16)
    # m sub-spaces; None: 4 if dim % 4 == 0, else 2 if dim is even, else 1 (then pq == vq)
    num_subspaces: int | None = None

    def __post_init__(self) -> None:
        if self.num_subspaces is None:
            self.num_subspaces = 4 if self.dim % 4 == 0 else 2 if self.dim % 2 == 0 else 1

    def validate(self) -> None:
        super().validate()
        m = self.num_subspaces
        if m < 1 or self.dim % m:
            raise ValueError(
                f"pq: num_subspaces must be a positive divisor of dim={self.dim}, got {m}"
            )


@register(PQConfig)
class ProductQuantizer(Quantizer):
    config: PQConfig

    def __init__(self, config: PQConfig):
        super().__init__(config)
        self.num_subspaces = config.num_subspaces
        self.codebook_dim = config.dim // config.num_subspaces
        self.codebook = Codebook(
            config.codebook_size,
            self.codebook_dim,
            num_groups=self.num_subspaces,
            owner="pq",
            **config.codebook_kwargs(),
        )
        self.usage = self.codebook.usage  # (m, K) counts; bits_per_token = m·log2 K

    def _subspace_of_rows(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Codebook index of each sub-vector row: 0, 1, ..., m-1, 0, 1, ... (N·m,)."""
        return torch.arange(self.num_subspaces, device=device).repeat(num_tokens)

    def quantize(self, z: torch.Tensor) -> Quantized:
        x, spatial = to_tokens(z)
        n = x.shape[0]
        sub = x.reshape(n * self.num_subspaces, self.codebook_dim)  # u_j(x), LooC seed eq. 2
        group = self._subspace_of_rows(n, x.device)
        e, codes, loss, hist = self.codebook(sub, group)  # q_j searches only C_j
        if self.config.distance == "cosine":
            sub = F.normalize(sub, dim=-1)
        z_q = from_tokens(straight_through(sub, e).reshape(n, self.dim), spatial)
        codes = from_tokens(codes.view(n, self.num_subspaces), spatial)  # (B, m, *S)
        return Quantized(z_q, codes, loss, self.usage.stats(hist))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() < 3 or codes.shape[1] != self.num_subspaces:
            raise ValueError(
                f"ProductQuantizer: expected codes (B, {self.num_subspaces}, *S), "
                f"got shape {tuple(codes.shape)}"
            )
        c, spatial = to_tokens(codes)
        group = self._subspace_of_rows(c.shape[0], c.device)
        e = self.codebook.lookup(c.reshape(-1), group)
        return from_tokens(e.reshape(-1, self.dim), spatial)
