"""ImageTokenizer: 2D conv encoder → any registry quantizer → 2D conv decoder.

VQ-VAE (arXiv:1711.00937), LooC-VAE (seed 001, sec. 4: LooC in CVQ-VAE's VQ-VAE network),
HR-VQVAE (seed 002) and PQ-VAE are flavours of it that differ only in `quantizer`.

Shapes: x_bchw images in [-1, 1]; z_bchw latents, (h, w) = ceil((H, W) / downsample).
Inputs whose size is not a multiple of `downsample` are zero-padded at the bottom/right
and the reconstruction is cropped back.

    tok = ImageTokenizerConfig.from_dict({"flavour": "vqvae_debug"}).build()
    x_hat, q = tok(x_bchw)           # q: Quantized(z_q, codes, loss, metrics)
    loss = F.mse_loss(x_hat, x_bchw) + q.loss   # + perceptual / GAN terms (vqcore.losses)
    codes = tok.tokenize(x_bchw); x_hat = tok.detokenize(codes, size=x_bchw.shape[-2:])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqcore.models.blocks import Decoder, Encoder, stage_strides
from vqcore.models.config import TokenizerConfig
from vqcore.quantizers import Quantized, build
from vqcore.quantizers.base import Codes

__all__ = ["FLAVOURS", "ImageTokenizer", "ImageTokenizerConfig", "pad_to_multiple"]


def pad_to_multiple(x: torch.Tensor, multiples: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the last len(multiples) dims at their end up to multiples of `multiples`."""
    pad: list[int] = []
    for size, m in zip(reversed(x.shape[-len(multiples) :]), reversed(multiples)):
        pad += [0, -size % m]
    return F.pad(x, pad) if any(pad) else x


@dataclass
class ImageTokenizerConfig(TokenizerConfig):
    """Conv VQ tokenizer of images; the encoder/decoder follow VQGAN/CVQ-VAE (see blocks.py)."""

    name = "image_tokenizer"

    in_channels: int = 3
    channels: int = 128  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per level
    num_res_blocks: int = 2  # ResBlocks per level
    latent_dim: int = 64  # channels of z = the quantizer's `dim`
    downsample: int = 4  # spatial factor f (power of 2, at most len(channel_mult) - 1 stages)
    norm: str = "group"  # "group" (VQGAN) | "channel" (per-position LayerNorm)
    norm_groups: int = 32
    dropout: float = 0.0
    shortcuts: bool = False  # DC-AE's parameter-free residual shortcuts (blocks.py)
    # registry spec without `dim` (filled with latent_dim), e.g. {"type": "looc"}
    quantizer: dict[str, Any] = field(default_factory=lambda: {"type": "vq", "codebook_size": 1024})

    def __post_init__(self) -> None:
        self.check_trunk()
        strides = stage_strides(self.downsample, 1, dims=2)  # raises on a bad factor
        if len(strides) > len(self.channel_mult) - 1:
            raise ValueError(
                f"image_tokenizer: downsample {self.downsample} needs "
                f"{len(strides) + 1} levels, channel_mult has "
                f"{len(self.channel_mult)}"
            )

    def build(self) -> ImageTokenizer:
        return ImageTokenizer(self)


class ImageTokenizer(nn.Module):
    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        self.config = c = config
        strides = stage_strides(c.downsample, 1, dims=2)
        net = c.trunk(strides)
        self.encoder = Encoder(2, c.in_channels, c.latent_dim, **net)
        self.quantizer = build(c.quantizer_config())
        self.decoder = Decoder(2, c.latent_dim, c.in_channels, **net)
        self.factor = c.downsample

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, for VQGAN's adaptive GAN weight (vqcore.losses)."""
        return self.decoder.conv_out.weight

    def check_input(self, x: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.factor
        expected = f"a (B, {c}, H, W) float tensor with H, W >= {f}"
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected {expected}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected {expected}, got dtype {x.dtype}")
        if x.dim() != 4 or x.shape[1] != c or min(x.shape[-2:]) < f:
            raise ValueError(f"{name}: expected {expected}, got shape {tuple(x.shape)}")

    def encode(self, x_bchw: torch.Tensor) -> torch.Tensor:
        """Images -> continuous latents z_bchw (before quantization)."""
        self.check_input(x_bchw)
        return self.encoder(pad_to_multiple(x_bchw, (self.factor, self.factor)))

    def quantize(self, z_bchw: torch.Tensor) -> Quantized:
        return self.quantizer(z_bchw)

    def decode(self, z_q: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Quantized latents -> images, cropped to `size` (H, W) if given."""
        x_hat = self.decoder(z_q)
        return x_hat if size is None else x_hat[..., : size[0], : size[1]]

    def forward(self, x_bchw: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        q = self.quantize(self.encode(x_bchw))
        return self.decode(q.z_q, x_bchw.shape[-2:]), q

    @torch.no_grad()
    def tokenize(self, x_bchw: torch.Tensor) -> Codes:
        """Codes of the images; no codebook update or usage count."""
        return self.quantizer.encode(self.encode(x_bchw))

    @torch.no_grad()
    def detokenize(self, codes: Codes, size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.decode(self.quantizer.decode(codes), size)


def _flavour(quantizer: dict[str, Any], debug: bool) -> ImageTokenizerConfig:
    """The CVQ-VAE-style ×4 network, or its tiny CPU version (16 channels, ×2)."""
    if not debug:
        return ImageTokenizerConfig(quantizer=quantizer)
    return ImageTokenizerConfig(
        channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        latent_dim=16,
        downsample=2,
        norm_groups=8,
        quantizer=quantizer,
    )


_QUANTIZERS = {
    "vqvae": ({"type": "vq", "codebook_size": 1024}, {"type": "vq", "codebook_size": 64}),
    "looc_vae": ({"type": "looc"}, {"type": "looc"}),  # seed 001: shared low-dim codebook
    "hrvq_vae": ({"type": "hrvq"}, {"type": "hrvq"}),  # seed 002: codebook tree
    "pq_vae": ({"type": "pq"}, {"type": "pq"}),
}
FLAVOURS: dict[str, ImageTokenizerConfig] = {}
for _name, (_full, _debug) in _QUANTIZERS.items():
    FLAVOURS[_name] = _flavour(_full, debug=False)
    FLAVOURS[f"{_name}_debug"] = _flavour(_debug, debug=True)
ImageTokenizerConfig.flavours = FLAVOURS
