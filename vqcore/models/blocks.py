"""Conv encoder/decoder blocks for 2D images and 3D clips, one implementation for both.

VQGAN (Esser et al., arXiv:2012.09841, fig. 2 / its `Encoder`, `Decoder`) and CVQ-VAE
(arXiv:2307.15139) style: ResBlock = norm → SiLU → conv3 → norm → SiLU → conv3 (+ 1×1 skip
projection when the width changes); levels of ResBlocks with channel multipliers; a stride-2
conv to downsample, nearest-neighbour ×2 + conv3 to upsample. No attention: PVQ-VAE puts a
global FFT branch where VQGAN has its mid attention (see `pvqvae.py`).

`dims` = 2 for (B, C, H, W), 3 for (B, C, T, H, W). Spatial and temporal factors are
separate: `stage_strides(spatial, temporal, dims)` gives the stride of every down-sampling
stage, e.g. space ×4, time ×2 → [(1, 2, 2), (2, 2, 2)] (time is reduced in the last stages).

`shortcuts` (DC-AE, Chen et al., arXiv:2410.10733, sec. 3.2 "residual autoencoding"): every
down-/up-sampling stage and the latent heads add a parameter-free path (average pooling,
nearest up-sampling, channel-group mean/repeat), so at initialisation the latent is close to
a linear, pooled view of the input and the network learns residuals on top of it.

Encoder and Decoder are split in two so a caller can tile the part that runs at high
resolution (`trunk`) and run the part at latent resolution (`head`) on the whole map:
    Encoder: trunk = conv_in + levels (+ down-sampling);  head = mid ResBlock, norm, conv_out
    Decoder: head = conv_in + mid ResBlock;  trunk = levels (+ up-sampling), norm, conv_out
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("group", "channel")
Stride = tuple[int, ...]


def conv(dims: int, cin: int, cout: int, kernel: int = 3, stride: Stride | int = 1) -> nn.Module:
    """Conv2d/Conv3d with 'same' padding for odd kernels."""
    cls = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return cls(cin, cout, kernel, stride=stride, padding=kernel // 2)


def _log2(factor: int, what: str) -> int:
    n = int(round(math.log2(factor))) if factor > 0 else -1
    if n < 0 or 2**n != factor:
        raise ValueError(f"{what} must be a power of 2, got {factor}")
    return n


def stage_strides(spatial_factor: int, temporal_factor: int, dims: int) -> list[Stride]:
    """Stride of each ×2 down-sampling stage: space in the first log2(spatial) stages,
    time in the last log2(temporal) ones (dims=2: temporal_factor must be 1)."""
    n_s = _log2(spatial_factor, "spatial down-sampling factor")
    n_t = _log2(temporal_factor, "temporal down-sampling factor")
    if dims == 2 and n_t:
        raise ValueError(f"a 2D model has no time axis, got temporal factor {temporal_factor}")
    n = max(n_s, n_t)
    strides = []
    for i in range(n):
        s = 2 if i < n_s else 1
        strides.append((s, s) if dims == 2 else (2 if i >= n - n_t else 1, s, s))
    return strides


def group_stages(
    strides: Sequence[Stride], channel_mult: Sequence[int], blocks: int
) -> tuple[list[Stride], list[int]]:
    """Merge consecutive ×2 stages into `blocks` up/down-sampling stages of larger stride
    (as even as possible, the larger groups first), with the channel multiplier of each
    group's boundary level: e.g. 5 stages, mult (1, 2, 2, 4, 4, 8), 3 blocks -> strides
    of stages [0, 1], [2, 3], [4] multiplied, mult (1, 2, 4, 8)."""
    n = len(strides)
    if not 1 <= blocks <= n:
        raise ValueError(f"cannot merge {n} sampling stages into {blocks} blocks (1..{n})")
    sizes = [n // blocks + (i < n % blocks) for i in range(blocks)]
    merged, mult, start = [], [channel_mult[0]], 0
    for size in sizes:
        group = strides[start : start + size]
        merged.append(tuple(math.prod(axis) for axis in zip(*group)))
        start += size
        mult.append(channel_mult[start])
    return merged, mult


class ChannelNorm(nn.Module):
    """LayerNorm over the channels at each position (ConvNeXt's channels-first LayerNorm,
    arXiv:2201.03545): a local norm, so tiled and untiled runs agree exactly away from tile
    borders (GroupNorm's statistics are per window). Statistics in float32."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's layer_norm over a channels-last view: one kernel each way, where the same
        # formula in elementwise ops (var_mean, sub, rsqrt, mul, add) streams the activation
        # ~8 times; with channels_last(_3d) memory the view is free. Outside autocast, which
        # would cast a bf16 x to fp32 and back (two more passes): the kernel keeps its
        # statistics in fp32 for bf16 input (BENCHMARKS.md, training-step roofline).
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.layer_norm(x.movedim(1, -1), x.shape[1:2], w, b, self.eps)
        return y.movedim(-1, 1)


def norm_layer(kind: str, channels: int, groups: int = 32) -> nn.Module:
    """`kind` "group": GroupNorm(gcd(groups, C)) as in VQGAN; "channel": `ChannelNorm`."""
    if kind == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)
    if kind == "channel":
        return ChannelNorm(channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ResBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))), 1×1 projection of x if cin != cout."""

    def __init__(
        self,
        dims: int,
        cin: int,
        cout: int,
        norm: str = "group",
        groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1, self.conv1 = norm_layer(norm, cin, groups), conv(dims, cin, cout)
        self.norm2, self.conv2 = norm_layer(norm, cout, groups), conv(dims, cout, cout)
        self.dropout = nn.Dropout(dropout)
        self.skip = conv(dims, cin, cout, kernel=1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-`stride` 3×3(×3) conv; halves each axis with stride 2 (even sizes).

    `shortcut`: plus the average over each stride window, DC-AE's parameter-free
    space-to-channel shortcut (Chen et al., arXiv:2410.10733, sec. 3.2, eq. 2: pixel-unshuffle
    then the mean of channel groups, which at equal width is this average pooling)."""

    def __init__(self, dims: int, channels: int, stride: Stride, shortcut: bool = False):
        super().__init__()
        self.conv = conv(dims, channels, channels, stride=stride)
        self.stride = tuple(stride)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.shortcut:
            pool = F.avg_pool3d if x.dim() == 5 else F.avg_pool2d
            h = h + pool(x, self.stride, self.stride)
        return h


class Upsample(nn.Module):
    """Nearest-neighbour up-sampling by `stride` per axis, then a 3×3(×3) conv.

    `shortcut`: plus the up-sampled input itself (DC-AE's channel-to-space shortcut,
    arXiv:2410.10733 sec. 3.2: channel duplication then pixel-shuffle, at equal width the
    nearest-neighbour up-sampling)."""

    def __init__(self, dims: int, channels: int, stride: Stride, shortcut: bool = False):
        super().__init__()
        self.stride = tuple(float(s) for s in stride)
        self.conv = conv(dims, channels, channels)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.stride, mode="nearest")
        return self.conv(up) + up if self.shortcut else self.conv(up)


def channel_mean(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Mean of consecutive channel groups, C -> `out_channels` (C a multiple of it)."""
    b, c = x.shape[:2]
    return x.reshape(b, out_channels, c // out_channels, *x.shape[2:]).mean(2)


def channel_repeat(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Each channel repeated, C -> `out_channels` (a multiple of C); inverse of the mean."""
    return x.repeat_interleave(out_channels // x.shape[1], dim=1)


def _widths(channels: int, channel_mult: Sequence[int], n_stages: int) -> list[int]:
    if len(channel_mult) < n_stages + 1:
        raise ValueError(
            f"channel_mult {tuple(channel_mult)} has {len(channel_mult)} levels; "
            f"{n_stages} down-sampling stages need at least {n_stages + 1}"
        )
    return [channels * m for m in channel_mult]


class Encoder(nn.Module):
    """x (B, in_channels, *S) -> z (B, out_channels, *S / strides).

    Level i has `num_res_blocks` ResBlocks at width channels·channel_mult[i]; stage i (after
    level i, for i < len(strides)) down-samples by strides[i].
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        strides: Sequence[Stride],
        norm: str = "group",
        norm_groups: int = 32,
        dropout: float = 0.0,
        shortcuts: bool = False,
    ):
        super().__init__()
        widths = _widths(channels, channel_mult, len(strides))
        block = dict(norm=norm, groups=norm_groups, dropout=dropout)
        self.conv_in = conv(dims, in_channels, widths[0])
        self.levels = nn.ModuleList()
        cin = widths[0]
        for i, width in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.Sequential(
                *[
                    ResBlock(dims, cin if j == 0 else width, width, **block)
                    for j in range(num_res_blocks)
                ]
            )
            cin = width
            level.down = (Downsample(dims, width, strides[i], shortcuts)
                          if i < len(strides) else None)  # fmt: skip
            self.levels.append(level)
        self.trunk_channels = cin
        self.mid = ResBlock(dims, cin, cin, **block)
        self.norm_out = norm_layer(norm, cin, norm_groups)
        self.conv_out = conv(dims, cin, out_channels)
        # DC-AE's shortcut to the latent: the trunk's channels averaged in groups
        self.head_shortcut = shortcuts and cin % out_channels == 0

    def trunk(
        self, x: torch.Tensor, inject: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Full-resolution part; `inject(i, h)` (if given) runs after down-sampling stage i."""
        h = self.conv_in(x)
        for i, level in enumerate(self.levels):
            h = level.blocks(h)
            if level.down is not None:
                h = level.down(h)
                if inject is not None:
                    h = inject(i, h)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.mid(h)
        z = self.conv_out(F.silu(self.norm_out(h)))
        return z + channel_mean(h, z.shape[1]) if self.head_shortcut else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class Decoder(nn.Module):
    """z (B, in_channels, *S) -> x (B, out_channels, *S · strides); mirror of `Encoder`."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        strides: Sequence[Stride],
        norm: str = "group",
        norm_groups: int = 32,
        dropout: float = 0.0,
        shortcuts: bool = False,
    ):
        super().__init__()
        widths = _widths(channels, channel_mult, len(strides))[::-1]
        block = dict(norm=norm, groups=norm_groups, dropout=dropout)
        n_up = len(strides)
        self.conv_in = conv(dims, in_channels, widths[0])
        self.head_shortcut = shortcuts and widths[0] % in_channels == 0  # latent repeated
        self.mid = ResBlock(dims, widths[0], widths[0], **block)
        self.levels = nn.ModuleList()
        cin = widths[0]
        for i, width in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.Sequential(
                *[
                    ResBlock(dims, cin if j == 0 else width, width, **block)
                    for j in range(num_res_blocks)
                ]
            )
            cin = width
            stage = len(widths) - 1 - i  # undo encoder stage `stage - 1`
            level.up = (Upsample(dims, width, strides[stage - 1], shortcuts)
                        if 0 < stage <= n_up else None)  # fmt: skip
            self.levels.append(level)
        self.norm_out = norm_layer(norm, cin, norm_groups)
        self.conv_out = conv(dims, cin, out_channels)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        if self.head_shortcut:
            h = h + channel_repeat(z, h.shape[1])
        return self.mid(h)

    def trunk(self, h: torch.Tensor) -> torch.Tensor:
        for level in self.levels:
            h = level.blocks(h)
            if level.up is not None:
                h = level.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.head(z))


def checkpoint_res_blocks(model: nn.Module) -> int:
    """Activation checkpointing (Chen et al., arXiv:1604.06174) of every `ResBlock` in
    `model`, in place; returns how many. Under autograd a block then keeps only its input
    and recomputes the rest in backward (torch's non-reentrant `checkpoint_wrapper`, RNG
    state replayed), so outputs and gradients are unchanged and a block's ~6 saved
    full-resolution tensors become 1, for one more forward of the blocks per step."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    count = sum(isinstance(m, ResBlock) for m in model.modules())
    if count:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, ResBlock))
    return count
