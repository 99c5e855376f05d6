"""Discriminators for adversarial training of tokenizers.

- `PatchDiscriminator2D`: the PatchGAN of pix2pix (Isola et al., arXiv:1611.07004, sec. 3.2.2)
  as used by VQGAN (Esser et al., arXiv:2012.09841, sec. 3.2; taming-transformers'
  `NLayerDiscriminator`): stride-2 4×4 convs with LeakyReLU(0.2) and a norm, then two stride-1
  4×4 convs; one logit per patch, shape (B, 1, h, w).
- `Discriminator3D`: the spatio-temporal discriminator of PVQ-VAE (seed
  `004_ff189c618a3d248c.txt`, sec. 2.2, Fig. 4): stages of Conv3d + SiLU + BatchNorm3d with
  increasing channels, interleaved with max-pooling, then a compact embedding (adaptive average
  pooling) and a linear head; one logit per clip, shape (B, 1).

Inputs are channel-first and in [-1, 1]: images (B, C, H, W), clips (B, C, T, H, W).
`input_ndim` says which; `vqcore.losses` folds frames into the batch when a 2D discriminator
judges video.

    disc = build_discriminator({"type": "disc3d", "flavour": "debug"})
    disc = PatchDiscriminator2DConfig.from_dict({"channels": 32}).build()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vqcore.models.config import SpecConfig, from_flavour

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


def _init_weights(module: nn.Module) -> None:
    """DCGAN/pix2pix init (taming `weights_init`): conv ~ N(0, 0.02), norm scale ~ N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _check_input(name: str, x: torch.Tensor, ndim: int, channels: int) -> None:
    layout = "(B, C, H, W)" if ndim == 4 else "(B, C, T, H, W)"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor {layout}, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name}: expected {channels} channels at dim 1 (channel-first {layout}), "
            f"got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor in [-1, 1], got {x.dtype}")


# --- 2D PatchGAN ------------------------------------------------------------------------------


@dataclass
class PatchDiscriminator2DConfig(SpecConfig):
    """PatchGAN settings; defaults are VQGAN's (ndf=64, 3 layers, BatchNorm)."""

    name: ClassVar[str] = "patch2d"

    in_channels: int = 3
    channels: int = 64  # ndf: width of the first conv
    num_layers: int = 3  # stride-2 convs; receptive field 70×70 at 3
    max_channel_mult: int = 8  # width caps at channels × this
    norm: str = "batch"  # "batch" | "group" | "none"

    @classmethod
    def debug(cls) -> PatchDiscriminator2DConfig:
        return cls(channels=8, num_layers=2)

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None) -> PatchDiscriminator2DConfig:
        return from_flavour("patch2d", cls, {"default": cls(), "debug": cls.debug()}, spec)

    def validate(self) -> None:
        if self.in_channels <= 0 or self.channels <= 0:
            raise ValueError("PatchDiscriminator2D: in_channels and channels must be positive")
        if self.num_layers < 1:
            raise ValueError(
                f"PatchDiscriminator2D: num_layers must be >= 1, got {self.num_layers}"
            )
        if self.max_channel_mult < 1:
            raise ValueError("PatchDiscriminator2D: max_channel_mult must be >= 1")
        if self.norm not in NORMS:
            raise ValueError(
                f"PatchDiscriminator2D: norm must be one of {NORMS}, got {self.norm!r}"
            )

    def build(self) -> PatchDiscriminator2D:
        return PatchDiscriminator2D(self)


class PatchDiscriminator2D(nn.Module):
    """(B, C, H, W) in [-1, 1] -> patch logits (B, 1, h, w), h = floor(H / 2^L) - 2."""

    input_ndim = 4

    def __init__(self, config: PatchDiscriminator2DConfig | None = None):
        super().__init__()
        config = config or PatchDiscriminator2DConfig()
        config.validate()
        self.config = config
        ndf, cap, bias = config.channels, config.max_channel_mult, config.norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, config.num_layers + 1):  # stride 2 for n < L, then one stride-1 conv
            prev, mult = mult, min(2**n, cap)
            stride = 2 if n < config.num_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                _norm(config.norm, ndf * mult, 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))  # patch logits
        self.net = nn.Sequential(*layers)
        _init_weights(self)

    @property
    def min_size(self) -> int:
        """Smallest H (and W) that leaves at least one patch: floor(H / 2^L) - 2 >= 1."""
        return 3 * 2**self.config.num_layers

    def output_size(self, size: int) -> int:
        return size // 2**self.config.num_layers - 2

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        _check_input("PatchDiscriminator2D", x_bchw, 4, self.config.in_channels)
        h, w = x_bchw.shape[-2:]
        if min(h, w) < self.min_size:
            raise ValueError(
                f"PatchDiscriminator2D: input {h}x{w} is too small for {self.config.num_layers} "
                f"stride-2 layers; H and W must be >= {self.min_size}"
            )
        return self.net(x_bchw)


# --- 3D discriminator of PVQ-VAE -------------------------------------------------------------


@dataclass
class Discriminator3DConfig(SpecConfig):
    """PVQ-VAE's 3D discriminator (seed 004, sec. 2.2): one stage per entry of `channels`,
    each `convs_per_stage` × (Conv3d k³ → SiLU → BatchNorm3d), max-pooling between stages
    (×2 in H, W and, while T ≥ 2 and `pool_time`, in T), adaptive average pooling, linear head.
    """

    name: ClassVar[str] = "disc3d"

    in_channels: int = 3
    channels: tuple[int, ...] = (64, 128, 256, 512)
    convs_per_stage: int = 1
    kernel_size: int = 3
    pool_time: bool = True
    norm: str = "batch"  # the seed's BatchNorm3d; "group" where batches are tiny
    embed_size: tuple[int, int, int] = (1, 1, 1)  # adaptive pooling target before the head

    @classmethod
    def debug(cls) -> Discriminator3DConfig:
        return cls(channels=(8, 16, 32))

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None) -> Discriminator3DConfig:
        spec = dict(spec or {})
        for key in ("channels", "embed_size"):  # YAML gives lists
            if isinstance(spec.get(key), list):
                spec[key] = tuple(spec[key])
        return from_flavour("disc3d", cls, {"default": cls(), "debug": cls.debug()}, spec)

    def validate(self) -> None:
        if self.in_channels <= 0 or not self.channels or min(self.channels) <= 0:
            raise ValueError("Discriminator3D: in_channels and every entry of channels must be > 0")
        if self.convs_per_stage < 1:
            raise ValueError("Discriminator3D: convs_per_stage must be >= 1")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"Discriminator3D: kernel_size must be odd, got {self.kernel_size}")
        if self.norm not in NORMS:
            raise ValueError(f"Discriminator3D: norm must be one of {NORMS}, got {self.norm!r}")
        if len(self.embed_size) != 3 or min(self.embed_size) < 1:
            raise ValueError("Discriminator3D: embed_size must be three positive ints (t, h, w)")

    def build(self) -> Discriminator3D:
        return Discriminator3D(self)


class Discriminator3D(nn.Module):
    """(B, C, T, H, W) in [-1, 1] -> one logit per clip (B, 1).

    Any T ≥ 1 and H, W ≥ `min_size` (= 2^(stages-1), so every spatial pool halves the map);
    odd sizes round up (ceil-mode pooling), and time is pooled only while it is ≥ 2.
    """

    input_ndim = 5

    def __init__(self, config: Discriminator3DConfig | None = None):
        super().__init__()
        config = config or Discriminator3DConfig()
        config.validate()
        self.config = config
        pad, bias = config.kernel_size // 2, config.norm == "none"
        stages, c_in = [], config.in_channels
        for c_out in config.channels:
            layers: list[nn.Module] = []
            for _ in range(config.convs_per_stage):
                layers += [  # seed 004, Fig. 4: Conv3d -> SiLU -> BatchNorm3d
                    nn.Conv3d(c_in, c_out, config.kernel_size, padding=pad, bias=bias),
                    # not in place: SiLU's backward needs its input, so autograd would copy it
                    nn.SiLU(),
                    _norm(config.norm, c_out, 3),
                ]
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.embed = nn.AdaptiveAvgPool3d(config.embed_size)  # compact latent embedding
        self.head = nn.Linear(c_in * math.prod(config.embed_size), 1)  # real/fake logit
        _init_weights(self)

    @property
    def min_size(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        t = h.shape[2]
        kt = 2 if (self.config.pool_time and t >= 2) else 1
        kernel = (kt, 2, 2)
        # a max is exact in any dtype: outside autocast, whose CPU policy runs max_pool3d in
        # fp32 (a cast there and back, and fp32 activations into the next convolution)
        with torch.autocast(h.device.type, enabled=False):
            return nn.functional.max_pool3d(h, kernel, stride=kernel, ceil_mode=True)

    def forward(self, x_bcthw: torch.Tensor) -> torch.Tensor:
        _check_input("Discriminator3D", x_bcthw, 5, self.config.in_channels)
        t, h, w = x_bcthw.shape[-3:]
        if t < 1 or min(h, w) < self.min_size:
            raise ValueError(
                f"Discriminator3D: input T×H×W = {t}x{h}x{w} is too small; need T >= 1 and "
                f"H, W >= {self.min_size} for {len(self.config.channels)} stages"
            )
        feat = x_bcthw
        for i, stage in enumerate(self.stages):
            if i > 0:  # max-pooling interleaved between stages
                feat = self._pool(feat)
            feat = stage(feat)
        return self.head(self.embed(feat).flatten(1))


DISCRIMINATORS: dict[str, type] = {
    "patch2d": PatchDiscriminator2DConfig,
    "disc3d": Discriminator3DConfig,
}


DiscriminatorConfig = PatchDiscriminator2DConfig | Discriminator3DConfig


def discriminator_config(
    spec: dict[str, Any] | DiscriminatorConfig, video: bool = False
) -> DiscriminatorConfig:
    """The typed, validated config of `{"type": "patch2d" | "disc3d", "flavour": "debug",
    **fields}`; without a type, the seed's 3D discriminator for a video tokenizer (`video`),
    PatchGAN for an image one. A typed config is returned as it is."""
    from vqcore.quantizers.registry import split_type

    if isinstance(spec, tuple(DISCRIMINATORS.values())):
        return spec
    spec = {"type": "disc3d" if video else "patch2d", **(spec or {})}
    name, rest = split_type(spec, "discriminator", list(DISCRIMINATORS))
    config = DISCRIMINATORS[name].from_dict(rest)
    config.validate()
    return config


def build_discriminator(spec: dict[str, Any] | DiscriminatorConfig) -> nn.Module:
    """`{"type": "patch2d" | "disc3d", "flavour": "debug", **fields}` -> a discriminator."""
    return discriminator_config(spec).build()
