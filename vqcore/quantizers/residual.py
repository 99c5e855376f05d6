"""`rvq` and `rvq_lfq`: residual quantization over levels of a child quantizer
(SoundStream, arXiv:2107.03312, Alg. 1; RQ-VAE, arXiv:2203.01941, sec. 3.1).

    r_1 = z;  for i = 1..L:  q_i = s_i · Q_i(r_i / s_i);  r_{i+1} = r_i - q_i        (Alg. 1)
    ẑ = Σ_i q_i

Q_i is any registered family built from the child config `inner` (`vq` -> RVQ, `lfq` -> the
"RVQ + LFQ" row of the PVQ-VAE ablation, seed 004 Table 1). s_i = scale_decay^i lets a child
with a fixed codebook (lfq's ±1) refine: level i quantizes the residual magnified by 2^i
(scale_decay 0.5, the default for lfq children), as in residual LFQ/FSQ of
vector-quantize-pytorch. `shared_codebook` makes every level use level 1's Codebook (RQ-VAE's
shared codebook); otherwise each level learns its own (SoundStream).

Quantize-dropout (SoundStream sec. 3.3): in training, with probability `quantize_dropout`,
only the first n ~ U{quantize_dropout_min, .., L} levels run; the draw is broadcast from rank 0
so every rank runs (and all-reduces in) the same levels. Codes are (B, n, *S); `decode`
accepts any prefix of levels (coarser reconstruction).

Gradients. Level i sees r_i = z - sg[Σ_{j<i} q_j], so its own loss terms (codebook, commitment,
entropy) act on z as in RQ-VAE (sec. 3.1, L_commit = Σ_d ‖z - sg[Σ_{j<=d} q_j]‖²). Each q_i then
also carries an identity path to z; the composite removes the extra ones so that, for
straight-through children, ∂ẑ/∂z = I exactly (the composite is itself straight-through), while
children whose outputs carry parameters (gvq's codebook, projections) keep their gradients:

    ẑ = ι + Σ_i (q_i - P_i ι),   ι = z - sg[z]  (value 0, Jacobian I)

with P_i the level's resampling (identity here; down/up-sampling in `pyramid`, which reuses
this class).

Loss. Σ_i s_i² · loss_i: level i's child sees the residual magnified by 1/s_i, so its
commitment β‖r_i/s_i - Q_i‖² is s_i^-2 times RQ-VAE's β‖r_i - q_i‖² = β‖r_{i+1}‖² (sec. 3.1,
L_commit = Σ_d ‖z - sg[Σ_{j<=d} q_j]‖²); weighting it by s_i² gives RQ-VAE's sum exactly (child
entropy terms are weighted alike). Summed unweighted, the finest of three lfq levels pulled on
the encoder 16 times harder than the coarsest and the debug PVQ-VAE did not learn at all
(BENCHMARKS.md, "Learning": 11.5 dB, below each clip's mean colour, vs 14.5 without the
losses). `level_loss_weights` w_i scales level i's term (Σ_i w_i s_i² loss_i); [0, .., 0, 1]
keeps the last level's alone, whose commitment is then the one on the full sum, ‖z - sg[ẑ]‖²
(with identity projections).

Usage: the composite's counter holds one row per level (G = L codebooks of the child's K
codes), so children must emit one code per position (vq, gvq, lfq with d <= 20, fsq, ...).

Shapes: z (B, C, *S); codes (B, n, *S) int64, codes[:, i] = level i's codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vqcore.ops import broadcast_
from vqcore.quantizers.base import (
    Codes,
    CodeUsage,
    Quantized,
    Quantizer,
    QuantizerConfig,
    add_scaled_identity,
    channels_last,
)
from vqcore.quantizers.codebook import Codebook
from vqcore.quantizers.registry import build, make_config, register


@dataclass
class LevelsConfig(QuantizerConfig):
    """Fields shared by the composites that stack levels of a child quantizer (rvq, rvq_lfq,
    pyramid)."""

    default_inner: ClassVar[str] = "vq"  # child type used when `inner` names none
    lfq_decay: ClassVar[float] = 0.5  # scale_decay when None and the child is lfq
    # child config, any registered family; `dim` is filled in (= this dim)
    inner: dict[str, Any] = field(default_factory=lambda: {"type": "vq"})
    shared_codebook: bool = False  # one Codebook for every level (child must have one, e.g. vq)
    # level i quantizes residual / scale_decay^i and scales back; None: `lfq_decay` for lfq
    # children (fixed ±1 codes), 1.0 otherwise (learned codebooks follow the residual's scale)
    scale_decay: float | None = None
    # w_i on level i's own loss (commitment, entropy) in Σ_i w_i s_i² loss_i; None: all 1,
    # except the last level's alone for a pyramid of lfq levels (see `pyramid`)
    level_loss_weights: list[float] | None = None
    lfq_last_loss_only: ClassVar[bool] = False  # the None default for lfq children

    @property
    def num_levels(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def child_config(self) -> QuantizerConfig:
        spec = dict(self.inner)
        spec.setdefault("type", self.default_inner)
        if spec.setdefault("dim", self.dim) != self.dim:
            raise ValueError(
                f"{self.type}: inner dim {spec['dim']} differs from dim {self.dim}; leave it out"
            )
        return make_config(spec)

    def loss_weights(self) -> list[float]:
        """w_i of every level: `level_loss_weights`, or its default."""
        if self.level_loss_weights is not None:
            return [float(w) for w in self.level_loss_weights]
        if self.lfq_last_loss_only and self.child_config().type == "lfq":
            return [0.0] * (self.num_levels - 1) + [1.0]
        return [1.0] * self.num_levels

    def level_scale(self, i: int) -> float:
        decay = self.scale_decay
        if decay is None:
            decay = self.lfq_decay if self.child_config().type == "lfq" else 1.0
        return decay**i

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.inner, dict):
            raise ValueError(f"{self.type}: inner must be a config dict, got {self.inner!r}")
        self.child_config().validate()
        if self.scale_decay is not None and self.scale_decay <= 0:
            raise ValueError(f"{self.type}: scale_decay must be > 0, got {self.scale_decay}")
        w = self.level_loss_weights
        if w is not None and (len(w) != self.num_levels or min(w) < 0):
            raise ValueError(
                f"{self.type}: level_loss_weights must be {self.num_levels} numbers >= 0, got {w}"
            )


@dataclass
class RVQConfig(LevelsConfig):
    type: ClassVar[str] = "rvq"
    num_quantizers: int = 4  # L levels
    quantize_dropout: float = 0.0  # probability that a training step keeps only n <= L levels
    quantize_dropout_min: int = 1  # fewest levels kept by quantize-dropout

    @property
    def num_levels(self) -> int:
        return self.num_quantizers

    def validate(self) -> None:
        super().validate()
        if self.num_quantizers < 1:
            raise ValueError(f"{self.type}: num_quantizers must be >= 1, got {self.num_quantizers}")
        if not 0 <= self.quantize_dropout <= 1:
            raise ValueError(f"{self.type}: quantize_dropout must lie in [0, 1]")
        if not 1 <= self.quantize_dropout_min <= self.num_quantizers:
            raise ValueError(
                f"{self.type}: quantize_dropout_min must lie in [1, num_quantizers], got "
                f"{self.quantize_dropout_min}"
            )


@dataclass
class RVQLFQConfig(RVQConfig):
    """Residual LFQ: `rvq` whose levels are `lfq` (the PVQ-VAE ablation's "RVQ + LFQ")."""

    type: ClassVar[str] = "rvq_lfq"
    default_inner: ClassVar[str] = "lfq"
    inner: dict[str, Any] = field(default_factory=lambda: {"type": "lfq"})

    def validate(self) -> None:
        if self.inner.get("type", "lfq") != "lfq":
            raise ValueError(f"rvq_lfq: inner type must be 'lfq', got {self.inner['type']!r}")
        super().validate()


@register(RVQConfig)
@register(RVQLFQConfig)
class ResidualQuantizer(Quantizer):
    config: LevelsConfig

    def __init__(self, config: LevelsConfig):
        super().__init__(config)
        child = config.child_config()
        self.levels = nn.ModuleList(build(child) for _ in range(config.num_levels))
        first = self.levels[0]
        if first.usage.num_codebooks != 1:
            raise ValueError(
                f"{config.type}: inner {child.type!r} counts {first.usage.num_codebooks} "
                "codebooks per position; levels need one code per position (e.g. vq, fsq, "
                "lfq with codebook_dim <= 20)"
            )
        if config.shared_codebook:
            codebook = getattr(first, "codebook", None)
            if not isinstance(codebook, Codebook):
                raise ValueError(
                    f"{config.type}: shared_codebook needs an inner family with a learned "
                    f"Codebook (e.g. vq), got {child.type!r}"
                )
            for level in self.levels[1:]:
                level.codebook, level.usage = codebook, codebook.usage
        self.usage = CodeUsage(first.usage.num_codes, config.num_levels)
        self.level_scales = [config.level_scale(i) for i in range(config.num_levels)]  # s_i
        self.loss_weights = [w * s**2 for w, s in zip(config.loss_weights(), self.level_scales)]

    @property
    def bits_per_token(self) -> float:
        return sum(level.bits_per_token for level in self.levels)

    def _scale(self, i: int, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x · s_i (x / s_i with `inverse`); s_i = 1 (learned codebooks) is no pass over x."""
        s = self.level_scales[i]
        if s == 1:
            return x
        return x / s if inverse else x * s

    # -- hooks that `pyramid` overrides: resampling per level, code layout, level count
    def _down(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def _up(self, i: int, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return x

    def _fuse(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def _identity_paths(self, z: torch.Tensor, q_sum: torch.Tensor, num: int, size) -> torch.Tensor:
        """ẑ = ι + Σ_i (q_i - P_i ι) = Σ_i q_i + (1 - n)·ι with P_i = I (see "Gradients")."""
        return add_scaled_identity(q_sum, z, 1.0 - num)

    def _pack(self, codes: list[torch.Tensor]) -> Codes:
        return torch.stack(codes, 1)

    def _unpack(self, codes: Codes) -> tuple[list[torch.Tensor], torch.Size]:
        """Per-level codes and the full spatial size they decode to."""
        if not isinstance(codes, torch.Tensor) or codes.dim() < 2:
            raise ValueError(f"{type(self).__name__}.decode: expected codes (B, L, *S)")
        if not 1 <= codes.shape[1] <= len(self.levels):
            raise ValueError(
                f"{type(self).__name__}.decode: codes have {codes.shape[1]} levels, "
                f"expected 1..{len(self.levels)}"
            )
        return list(codes.unbind(1)), codes.shape[2:]

    def _active_levels(self, device: torch.device) -> int:
        """All levels, or n ~ U{min, .., L} with prob. quantize_dropout in training."""
        num, p = len(self.levels), self.config.quantize_dropout
        if not self.training or p <= 0:
            return num
        n = torch.tensor(num)
        if torch.rand(()) < p:
            n = torch.randint(self.config.quantize_dropout_min, num + 1, ())
        return int(broadcast_(n.to(device)))  # same levels on every rank

    # -- forward / decode
    def quantize(self, z: torch.Tensor) -> Quantized:
        size = z.shape[2:]
        # every level lays its input out as (N, C) tokens: with channels last in memory that
        # is a view, so the residual is copied to that layout once rather than once per level
        q_sum, residual = None, channels_last(z)
        loss = z.new_zeros(())
        codes: list[torch.Tensor] = []
        metrics: dict[str, torch.Tensor] = {}
        num = self._active_levels(z.device)
        for i in range(num):
            out = self.levels[i].quantize(self._scale(i, self._down(i, residual), inverse=True))
            q = self._fuse(i, self._up(i, self._scale(i, out.z_q), size))  # s_i Q_i(r_i / s_i)
            q_sum = q if q_sum is None else q_sum + q
            residual = residual - q.detach()  # r_{i+1} = r_i - q_i (Alg. 1)
            loss = loss + out.loss * self.loss_weights[i]  # in z's units (see "Loss")
            codes.append(out.codes)
            metrics.update({f"level{i}/{k}": v for k, v in out.metrics.items()})
        hist = self._count(codes)
        metrics.update(CodeUsage.stats(hist[:num]))
        metrics["levels"] = torch.tensor(float(num))
        return Quantized(
            self._identity_paths(z, q_sum, num, size), self._pack(codes), loss, metrics
        )

    def _count(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """One (L, K) histogram for all levels: a single all-reduce in training."""
        flat = torch.cat([c.reshape(-1) for c in codes])
        group = torch.cat(
            [torch.full((c.numel(),), i, device=flat.device) for i, c in enumerate(codes)]
        )
        return self.usage.update(flat, group, sync=self.training)

    def decode(self, codes: Codes) -> torch.Tensor:
        parts, size = self._unpack(codes)
        z_q = None
        for i, c in enumerate(parts):
            q = self._fuse(i, self._up(i, self._scale(i, self.levels[i].decode(c)), size))
            z_q = q if z_q is None else z_q + q
        return z_q
