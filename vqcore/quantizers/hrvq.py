"""`hrvq`: HR-VQVAE's hierarchical residual codebook tree (Adiban et al., "Hierarchical
residual learning based vector quantized variational autoencoder", BMVC 2022; seed 002).

Layer 1 has one codebook of K codes; layer i has K^(i-1) codebooks of K codes, one per code
path of the layers above, and quantizes the residual of layer i-1 searching ONLY the
codebook its parent path selects (local search, eq. 3):

    ξ⁰ = z,   e^i = Quantize^i(ξ^(i-1)) within codebook p_(i-1),   ξ^i = ξ^(i-1) - e^i,
    e_C = Σ_i e^i                                                          (eq. 4)

The codebook of layer i is the mixed-radix number of the parent path (all radices K):
p_0 = 0, p_i = p_(i-1)·K + k_i, so layer i is a Codebook with G = K^(i-1), group = p_(i-1).
Loss (eq. 5-6, recon term left to the model):

    ||sg[ξ⁰] - e_C||² + β₀||sg[e_C] - ξ⁰||² + Σ_i (||sg[ξ^(i-1)] - e^i||² + β_i||sg[e^i] - ξ^(i-1)||²)

The residual passed down uses sg[e^i] (as in residual VQ), so codebook i learns from its own
eq. 6 term and the joint e_C term. With `update="ema"` codebooks follow the EMA rule and only
the commitment terms (β) remain in the loss.

Shapes: z (B, C, *S) -> tokens (N, C); codes (B, n, *S), codes[:, i] = k_(i+1), the code's
index inside its own codebook; `decode` recomputes the path. A tree has C·(K + K² + … + K^n)
parameters: sizes above `max_codebook_params` are refused at build time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vqcore.quantizers.base import (
    CodeUsage,
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
class HRVQConfig(VQConfig):
    """HR-VQ codebook tree; the learning-rule fields (update, ema_decay, cvq_*) are VQConfig's
    and apply to every codebook. `distance` must be "l2" (residuals of unit vectors are not)."""

    type: ClassVar[str] = "hrvq"
    codebook_size: int = 16  # K codes per codebook; K^n composite codes
    num_layers: int = 3  # n; n·log2 K bits per position
    # [β₀, β₁, ..., β_n] of eq. 5-6 (β₀ weighs the joint e_C commitment); None: all = beta
    betas: list[float] | None = None
    max_codebook_params: int = 1 << 26  # refuse trees with more codebook floats than this

    def layer_betas(self) -> list[float]:
        return list(self.betas) if self.betas is not None else [self.beta] * (self.num_layers + 1)

    def tree_params(self) -> int:
        """C·(K + K² + ... + K^n): every codebook of every layer."""
        k = self.codebook_size
        return self.dim * sum(k**i for i in range(1, self.num_layers + 1))

    def validate(self) -> None:
        super().validate()
        if self.num_layers < 1:
            raise ValueError(f"hrvq: num_layers must be >= 1, got {self.num_layers}")
        if self.betas is not None and len(self.betas) != self.num_layers + 1:
            raise ValueError(
                f"hrvq: betas needs num_layers + 1 = {self.num_layers + 1} values "
                f"[beta_0, beta_1, ...], got {list(self.betas)}"
            )
        if self.distance != "l2":
            raise ValueError(
                f"hrvq: distance must be 'l2' (residual layers), got {self.distance!r}"
            )
        params = self.tree_params()
        if params > self.max_codebook_params:
            k, n = self.codebook_size, self.num_layers
            raise ValueError(
                f"hrvq: a tree of {n} layers of {k}-code codebooks over dim={self.dim} has "
                f"{params:,} codebook parameters ({k}^{n - 1} = {k ** (n - 1):,} codebooks in the "
                f"last layer), over max_codebook_params={self.max_codebook_params:,}; lower "
                "num_layers or codebook_size, or raise max_codebook_params"
            )


@register(HRVQConfig)
class HierarchicalResidualQuantizer(Quantizer):
    config: HRVQConfig

    def __init__(self, config: HRVQConfig):
        super().__init__(config)
        k, betas = config.codebook_size, config.layer_betas()
        self.codebook_size, self.num_layers, self.beta0 = k, config.num_layers, betas[0]
        kwargs = config.codebook_kwargs()
        self.layers = nn.ModuleList(
            Codebook(k, config.dim, num_groups=k**i, owner="hrvq", **{**kwargs, "beta": beta})
            for i, beta in enumerate(betas[1:])  # layer i+1: K^i codebooks, one per parent path
        )
        self.usage = self.layers[-1].usage  # (K^(n-1), K): one count per full code path

    @property
    def bits_per_token(self) -> float:
        return self.num_layers * math.log2(self.codebook_size)

    def usage_stats(self) -> dict[str, float]:
        """Usage and perplexity of full code paths (the last layer) and of each layer."""
        stats = _path_stats([layer.usage.counts for layer in self.layers])
        return {k: float(v) for k, v in stats.items()}

    def quantize(self, z: torch.Tensor) -> Quantized:
        x, spatial = to_tokens(z)  # ξ⁰ (N, C)
        residual, e_c, path, loss = x, torch.zeros_like(x), None, x.new_zeros(())
        codes, hists = [], []
        for layer in self.layers:
            # eq. 3 searched only in codebook `path`; eq. 6 for this layer
            e, k_i, layer_loss, hist = layer(residual, path)
            loss = loss + layer_loss
            e_c = e_c + e  # eq. 4
            residual = residual - e.detach()  # ξ^i = ξ^(i-1) - e^i
            path = k_i if path is None else path * self.codebook_size + k_i
            codes.append(k_i)
            hists.append(hist)
        loss = loss + self.beta0 * F.mse_loss(x, e_c.detach())  # eq. 5: β₀||sg[e_C] - ξ⁰||²
        if self.config.update == "grad":
            loss = loss + F.mse_loss(e_c, x.detach())  # eq. 5: ||sg[ξ⁰] - e_C||²
        z_q = from_tokens(straight_through(x, e_c), spatial)
        codes_bns = from_tokens(torch.stack(codes, 1), spatial)  # (B, n, *S)
        return Quantized(z_q, codes_bns, loss, _path_stats(hists))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() not in (4, 5) or codes.shape[1] != self.num_layers:
            raise ValueError(
                f"HierarchicalResidualQuantizer: expected codes (B, {self.num_layers}, *S), "
                f"got shape {tuple(codes.shape)}"
            )
        c, spatial = to_tokens(codes)  # (N, n)
        e_c, path = None, None
        for i, layer in enumerate(self.layers):
            e = layer.lookup(c[:, i], path)
            e_c = e if e_c is None else e_c + e
            path = c[:, i] if path is None else path * self.codebook_size + c[:, i]
        return from_tokens(e_c, spatial)


def _path_stats(hists: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer i, usage and perplexity of its K^i code paths (a layer's (K^(i-1), K)
    histogram flattened); the unsuffixed `usage`/`perplexity` are the last layer's, i.e. of
    full codes."""
    stats: dict[str, torch.Tensor] = {}
    for i, hist in enumerate(hists, 1):
        for key, value in CodeUsage.stats(hist.reshape(1, -1)).items():
            stats[f"{key}_layer{i}"] = value
    stats["usage"] = stats[f"usage_layer{len(hists)}"]
    stats["perplexity"] = stats[f"perplexity_layer{len(hists)}"]
    return stats
