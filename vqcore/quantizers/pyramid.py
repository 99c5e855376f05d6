"""`pyramid`: residual quantization over a pyramid of scales, coarse to fine (the PVQ of the
PVQ-VAE seed 004, sec. 2.1 and Table 1; the multi-scale residual quantizer of VAR,
arXiv:2404.02905, Alg. 1).

    r_1 = z;  for scale k = 1..K (factors f_1 >= .. >= f_K = 1):
        q_k = φ_k(up_k(s_k · Q_k(down_k(r_k) / s_k)));  r_{k+1} = r_k - q_k
    ẑ = Σ_k q_k

down_k: area average over f×f blocks (f×f×f with `downsample_time` on (B, C, T, H, W) input);
a size n not divisible by f gives ceil(n / f) cells, the last averaging only the positions
that exist. up_k: `nearest` or `linear` (bilinear 2D, trilinear 3D) upsampling by f, cropped
back to n. φ_k: a learned per-scale 1×1 conv initialised to the identity (`projections`, on
by default; VAR's per-scale φ, here 1×1; the seed's "pyramidal token fusion"), applied in
forward and decode alike, or the identity. With LFQ levels it is what lets a level's fixed ±1
codes land on a learned vector: in the debug PVQ-VAE's quantizer study PVQ went from 17.55 ±
0.09 to 17.79 ± 0.20 dB, SSIM 0.605 to 0.630 (3 seeds; BENCHMARKS.md "What else PVQ's levels
need"); VAR's own 3×3 φ (x/2 + conv3×3(x)/2) and a learned per-level gain did not help there. Q_k: any registered family from `inner` — `lfq` (default) is PVQ, `vq` is the
PSVQ row of the ablation; `shared_codebook` gives one codebook for every scale as in VAR.
s_k = scale_decay^k as in `rvq`, but 1 by default for every child: a level's residual is
finer in resolution, not smaller in magnitude (VAR's Alg. 1 scales no level). With 0.5, the
rvq_lfq default, the one full-resolution level of a 3-scale PVQ was worth a quarter of the
coarsest and PVQ trailed single LFQ (BENCHMARKS.md "PVQ's level scaling").

Losses: with `lfq` levels only the finest level's own loss counts by default
(`level_loss_weights` None -> [0, .., 0, 1]); its commitment is then β‖z - sg[ẑ]‖², the full
sum's (identity projections). RQ-VAE (sec. 3.1) and VAR (FoundationVision/VAR, models/quant.py)
commit z to the partial sum at every depth, which suits learned codebooks; with fixed ±1 codes
a coarse level's commitment asks the finer levels' codes to average to 0 over each of its
cells, spending their bits. In the debug PVQ-VAE's quantizer study (3 seeds) PVQ scored
17.94 ± 0.11 against 17.81 ± 0.19 dB, ahead in the mean but inside the spread, and +0.5-0.7 dB
in every seed at step 500; the demo 20.03 against 19.44 (BENCHMARKS.md "The levels' losses").
Learned codebooks (`vq`: PSVQ) keep every level's loss: its codebook term is what trains them.

Everything else (child losses summed with their weights, straight-through ∂ẑ/∂z = I for straight-through
children, per-scale usage rows, scale factors) is `ResidualQuantizer`'s, with P_k = up_k∘down_k
the resampling in ẑ = ι + Σ_k (q_k - P_k ι).

`scales`: downsample factors (ints >= 1) or fractions of the full size (1/f, e.g. 0.25),
non-increasing, ending at full resolution (1), so `decode` reads the output size from the
finest codes. Codes: a tuple, one (B, *S_k) tensor per scale, S_k = ceil(S / f_k).
`bits_per_token` is per full-resolution position: Σ_k bits_k / f_k² (f_k³ with
downsample_time); the forward's metric counts the actual codes of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vqcore.quantizers.base import Codes, Quantized, from_tokens, to_tokens
from vqcore.quantizers.registry import register
from vqcore.quantizers.residual import LevelsConfig, ResidualQuantizer

UPSAMPLE = ("nearest", "linear")


@dataclass
class PyramidConfig(LevelsConfig):
    type: ClassVar[str] = "pyramid"
    default_inner: ClassVar[str] = "lfq"
    lfq_decay: ClassVar[float] = 1.0  # levels differ in resolution, not magnitude (see above)
    lfq_last_loss_only: ClassVar[bool] = True  # lfq levels: the finest level's loss alone (above)
    inner: dict[str, Any] = field(default_factory=lambda: {"type": "lfq"})  # lfq: PVQ, vq: PSVQ
    scales: list[float] = field(default_factory=lambda: [4, 2, 1])  # factors, coarse to fine
    downsample_time: bool = False  # also pool T of (B, C, T, H, W) input by the factor
    upsample: str = "linear"  # "nearest" | "linear" (bilinear / trilinear)
    projections: bool = True  # learned per-scale 1×1 conv after upsampling (identity init)

    @property
    def factors(self) -> tuple[int, ...]:
        return tuple(round(1 / s) if s < 1 else round(s) for s in self.scales)

    @property
    def num_levels(self) -> int:
        return len(self.scales)

    def validate(self) -> None:
        super().validate()
        bad = [s for s in self.scales if not (s > 0 and abs((1 / s if s < 1 else s) % 1) < 1e-6)]
        if not self.scales or bad:
            raise ValueError(
                f"pyramid: scales must be integer factors >= 1 or fractions 1/f, got {self.scales}"
            )
        f = self.factors
        if f[-1] != 1 or any(a < b for a, b in zip(f, f[1:])):
            raise ValueError(
                f"pyramid: scales must go coarse to fine and end at full resolution (1), got {f}"
            )
        if self.upsample not in UPSAMPLE:
            raise ValueError(f"pyramid: upsample must be one of {UPSAMPLE}, got {self.upsample!r}")


@register(PyramidConfig)
class PyramidQuantizer(ResidualQuantizer):
    config: PyramidConfig

    def __init__(self, config: PyramidConfig):
        super().__init__(config)
        self.factors = config.factors
        self.fuse = None
        if config.projections:
            self.fuse = nn.ModuleList(nn.Linear(config.dim, config.dim) for _ in self.factors)
            for lin in self.fuse:
                nn.init.eye_(lin.weight)
                nn.init.zeros_(lin.bias)

    def _area(self, i: int) -> int:
        f = self.factors[i]
        return f**3 if self.config.downsample_time else f**2

    @property
    def bits_per_token(self) -> float:
        return sum(lvl.bits_per_token / self._area(i) for i, lvl in enumerate(self.levels))

    def _kernel(self, i: int, rank: int) -> tuple[int, ...]:
        f = self.factors[i]
        if rank == 4:
            return (f, f)
        return (f if self.config.downsample_time else 1, f, f)

    def _down(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.factors[i] == 1:
            return x
        kernel = self._kernel(i, x.dim())
        pool = F.avg_pool2d if x.dim() == 4 else F.avg_pool3d
        pad: list[int] = []  # F.pad order: last dim first; pad the end up to a multiple
        for n, k in zip(reversed(x.shape[2:]), reversed(kernel)):
            pad += [0, -n % k]
        if not any(pad):
            return pool(x, kernel)
        valid = F.pad(x.new_ones(1, 1, *x.shape[2:]), pad)
        return pool(F.pad(x, pad), kernel) / pool(valid, kernel)  # mean over existing cells

    def _up(self, i: int, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if self.factors[i] == 1:
            return x
        kernel = self._kernel(i, x.dim())
        full = [n * k for n, k in zip(x.shape[2:], kernel)]
        if self.config.upsample == "nearest":
            y = F.interpolate(x, size=full, mode="nearest")
        else:
            mode = "bilinear" if x.dim() == 4 else "trilinear"
            y = F.interpolate(x, size=full, mode=mode, align_corners=False)
        return y[(..., *(slice(0, n) for n in size))]

    def _fuse(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.fuse is None:
            return x
        tokens, spatial = to_tokens(x)
        return from_tokens(self.fuse[i](tokens), spatial)

    def _identity_paths(self, z: torch.Tensor, q_sum: torch.Tensor, num: int, size) -> torch.Tensor:
        """ẑ = ι + Σ_i (q_i - P_i ι), P_i = up ∘ down of level i (see rvq's "Gradients")."""
        identity = z - z.detach()
        paths = sum(self._up(i, self._down(i, identity), size) for i in range(num))
        return q_sum + identity - paths

    def _pack(self, codes: list[torch.Tensor]) -> Codes:
        return tuple(codes)

    def _unpack(self, codes: Codes) -> tuple[list[torch.Tensor], torch.Size]:
        if not isinstance(codes, (tuple, list)) or len(codes) != len(self.levels):
            raise ValueError(
                f"{type(self).__name__}.decode: expected a tuple of {len(self.levels)} per-scale "
                "code tensors (B, *S_k)"
            )
        return list(codes), codes[-1].shape[1:]  # the last scale is full resolution

    def _active_levels(self, device: torch.device) -> int:
        return len(self.levels)

    def quantize(self, z: torch.Tensor) -> Quantized:
        out = super().quantize(z)
        positions = z.numel() // z.shape[1]
        bits = sum(c.numel() * lvl.bits_per_token for c, lvl in zip(out.codes, self.levels))
        out.metrics["bits_per_token"] = torch.tensor(bits / positions)
        return out
