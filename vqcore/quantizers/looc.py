"""`looc`: LooC, a low-dimensional codebook for compositional VQ (LooC seed 001, sec. 3.2-3.4).

Low-dimensional codebook (sec. 3.2): each C-vector is split into sub-vectors of dim d and
EVERY sub-vector is quantized by the ONE shared codebook of K codes of dim d (Codebook with
G = 1), so K·d parameters give K^m composite codes; unlike PQ (seed eq. 2) there is no
per-position codebook. d = C is plain VQ.

Matching (supplementary 1.2): by cosine similarity (the default, `distance: cosine`), and the
code out is the raw code, as in the authors' public code (Visual-AI/LooC `quantise.py`);
`distance: l2` is plain nearest-code matching.

Extrapolation-by-interpolation (sec. 3.2, "Feature Enhancement and Smoothness"): the latent
map is upsampled ×α with bilinear interpolation, every vector of the larger map is quantized,
and α×α average pooling brings it back to the input size. α is an integer and the upsampled
size is exactly α·S, so pooling with kernel = stride = α restores S for any S. α = 1 disables
it. 3D input (B, C, T, H, W): by default H and W are upsampled per frame (time kept, pool
(1, α, α)); `interpolate_time=True` upsamples T too (trilinear, pool (α, α, α)).

Sub-vector grouping (the paper's text allows either; both cost α²·C/d codes per input
position):
- "channels" (default): d adjacent channels at one position of the upsampled map; codes
  (B, C/d, *S↑).
- "patch": the authors' code, `pixel_unshuffle` by α before the split, so with d = α² a
  sub-vector is the α×α patch of ONE channel (generally: d consecutive entries of the
  unshuffled channel order c·α² + i·α + j); codes (B, C·α²/d, *S) at the input grid.

Loss (seed eq. 3, recon term left to the model): ||sg[z↑] - e||² + β||z↑ - sg[e]||² on the
sub-vectors of the upsampled map z↑; the straight-through estimator sits on z↑, so the
gradient to z passes through the (parameter-free, linear) upsample and pool, as when LooC is
plugged between them in a VQ-VAE. CVQ-VAE re-anchoring of dead codes is on by default (sec. 3.4).
Decode = lookup, concat, (shuffle), pool, which is exactly the eval-mode forward z_q.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
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

GROUPINGS = ("channels", "patch")


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """`fn` of an image batch (B, C, H, W), applied to each frame of a clip (B, C, T, H, W)."""
    if x.dim() == 4:
        return fn(x)
    b, t = x.shape[0], x.shape[2]
    return fn(x.transpose(1, 2).flatten(0, 1)).unflatten(0, (b, t)).transpose(1, 2)


@dataclass
class LooCConfig(VQConfig):
    """LooC; the learning-rule fields (beta, update, ema_decay, distance, cvq_*) are
    VQConfig's and apply to the shared codebook."""

    type: ClassVar[str] = "looc"
    codebook_size: int = 64  # K shared codes, small by design (seed sec. 4.2)
    # d, dim of a sub-vector and of a code; None: 4 if dim % 4 == 0, else 2 if even, else 1
    codebook_dim: int | None = None
    alpha: int = 2  # extrapolation-by-interpolation factor α (paper's best: 2); 1 disables
    interpolate_time: bool = False  # 3D input: also upsample T (trilinear) instead of H, W only
    grouping: str = "channels"  # "channels" | "patch" (the authors' pixel_unshuffle split)
    distance: str = "cosine"  # supplementary 1.2; the raw code is output (see module doc)
    cvq: bool = True  # CVQ-VAE re-anchoring of dead codes (seed sec. 3.4)

    def __post_init__(self) -> None:
        if self.codebook_dim is None:
            self.codebook_dim = 4 if self.dim % 4 == 0 else 2 if self.dim % 2 == 0 else 1

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.alpha, int) or isinstance(self.alpha, bool) or self.alpha < 1:
            raise ValueError(f"looc: alpha must be an integer >= 1, got {self.alpha!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"looc: grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if self.grouping == "patch" and self.interpolate_time:
            raise ValueError("looc: grouping 'patch' splits α×α patches of each frame; "
                             "interpolate_time needs grouping 'channels'")  # fmt: skip
        split = self.dim * (self.alpha**2 if self.grouping == "patch" else 1)
        d = self.codebook_dim
        if d < 1 or split % d:
            raise ValueError(f"looc: codebook_dim must be a positive divisor of "
                             f"{split} (dim, times α² with grouping 'patch'), got {d}")  # fmt: skip


@register(LooCConfig)
class LooCQuantizer(Quantizer):
    config: LooCConfig

    def __init__(self, config: LooCConfig):
        super().__init__(config)
        self.codebook_dim = config.codebook_dim
        self.alpha = config.alpha
        self.patch = config.grouping == "patch"
        # channels of the map that is split: C at S↑, or C·α² at S after pixel_unshuffle
        self.split_dim = config.dim * (config.alpha**2 if self.patch else 1)
        # ONE K×d codebook shared by all sub-vectors (seed sec. 3.2); cosine matching outputs
        # the raw code (the authors' rule)
        self.codebook = Codebook(config.codebook_size, config.codebook_dim, owner="looc",
                                 raw_output=True, **config.codebook_kwargs())  # fmt: skip
        self.usage = self.codebook.usage

    # -- extrapolation-by-interpolation
    def _factors(self, rank: int) -> tuple[int, ...]:
        """Upsampling factor per spatial dim of a rank-4 (H, W) or rank-5 (T, H, W) tensor."""
        a = self.alpha
        if rank == 4:
            return (a, a)
        return (a if self.config.interpolate_time else 1, a, a)

    def _upsample(self, z: torch.Tensor) -> torch.Tensor:
        """Bilinear ×α over (H, W) (trilinear over T too if `interpolate_time`), exact size
        α·S. A factor-1 dim under trilinear with align_corners=False samples the source
        exactly (weight 1 on frame t, 0 on t+1), so that is per-frame bilinear."""
        if self.alpha == 1:
            return z
        factors = self._factors(z.dim())
        size = [s * f for s, f in zip(z.shape[2:], factors)]
        mode = "bilinear" if z.dim() == 4 else "trilinear"
        return F.interpolate(z, size=size, mode=mode, align_corners=False)

    def _pool(self, q_up: torch.Tensor) -> torch.Tensor:
        """α×α (×α) average pooling, kernel = stride, back to the input size."""
        if self.alpha == 1:
            return q_up
        factors = self._factors(q_up.dim())
        pool = F.avg_pool2d if q_up.dim() == 4 else F.avg_pool3d
        return pool(q_up, kernel_size=factors, stride=factors)

    def _unshuffle(self, z_up: torch.Tensor) -> torch.Tensor:
        """The "patch" grouping: (B, C, *S↑) -> (B, C·α², *S) by pixel_unshuffle per frame."""
        if not self.patch:
            return z_up
        return _per_frame(partial(F.pixel_unshuffle, downscale_factor=self.alpha), z_up)

    def _shuffle(self, q: torch.Tensor) -> torch.Tensor:
        """Inverse of `_unshuffle`."""
        if not self.patch:
            return q
        return _per_frame(partial(F.pixel_shuffle, upscale_factor=self.alpha), q)

    def _bits(self, rank: int) -> float:
        """Codes per input position × log2 K: α^k · C/d ("channels", k = number of
        upsampled dims) or C·α²/d ("patch"), the same for the same α."""
        per_position = self.split_dim // self.codebook_dim
        if not self.patch:
            per_position *= math.prod(self._factors(rank))
        return per_position * math.log2(self.config.codebook_size)

    @property
    def bits_per_token(self) -> float:
        """For 2D input (and 3D with time kept); 3D with `interpolate_time` costs α× more,
        which the forward's `bits_per_token` metric reports."""
        return self._bits(4)

    # -- quantizer API
    def quantize(self, z: torch.Tensor) -> Quantized:
        x, spatial = to_tokens(self._unshuffle(self._upsample(z)))  # (N, C) or (N, C·α²)
        n, per = x.shape[0], self.split_dim // self.codebook_dim
        sub = x.reshape(n * per, self.codebook_dim)  # every sub-vector: a token of ONE codebook
        e, codes, loss, hist = self.codebook(sub)  # seed eq. 3 codebook + commitment terms
        q = from_tokens(straight_through(sub, e).reshape(n, self.split_dim), spatial)
        z_q = self._pool(self._shuffle(q))
        metrics = self.usage.stats(hist)
        metrics["bits_per_token"] = torch.tensor(self._bits(z.dim()))
        return Quantized(z_q, from_tokens(codes.view(n, per), spatial), loss, metrics)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        per = self.split_dim // self.codebook_dim
        if codes.dim() not in (4, 5) or codes.shape[1] != per:
            grid = "S" if self.patch else "S↑"
            raise ValueError(
                f"LooCQuantizer: expected codes (B, {per}, *{grid}) with {grid} = (H, W) or "
                f"(T, H, W), got shape {tuple(codes.shape)}"
            )
        factors = self._factors(codes.dim())
        if not self.patch and any(s % f for s, f in zip(codes.shape[2:], factors)):
            raise ValueError(
                f"LooCQuantizer: upsampled code grid {tuple(codes.shape[2:])} is not a "
                f"multiple of the factors {factors} (alpha={self.alpha})"
            )
        c, spatial = to_tokens(codes)  # (N, per)
        e = self.codebook.lookup(c.reshape(-1)).reshape(-1, self.split_dim)  # concat the codes
        return self._pool(self._shuffle(from_tokens(e, spatial)))
