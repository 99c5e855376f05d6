"""PVQ-VAE: a video tokenizer with FFT and wavelet encoder branches (seed 004).

Seed 004 sec. 2.1 (fig. 3): conv blocks down-sample T×H×W×3 to a latent T/16 × H/32 × W/32 × d
(d = 16 with LFQ), quantized by pyramidal residual quantization (PVQ = `pyramid` with inner
`lfq`; swappable for the sec. 3.1 ablation: vq, gvq, lfq, rvq, pyramid+vq (PSVQ), rvq_lfq),
then up-sampling decoder blocks with projections back to T×H×W×3. Sec. 3.2-3.3: an FFT branch
(global structure) and a DWT branch (local detail) in the encoder, each switchable
(`use_fft`, `use_dwt`) for the four-way frequency ablation. Where the seed leaves details
open, this file chooses:

- DWT branch: a multi-level DWT of the (padded) input clip, one level per down-sampling
  stage along the axes that stage halves (3D where time is halved, per-frame 2D elsewhere);
  level l's sub-bands are projected by a 1×1 conv and added after stage l. Local, so it
  tiles exactly (haar) or nearly so (longer wavelets).
- FFT branch: a spectral transform in the style of Fast Fourier Convolution (Chi et al.,
  NeurIPS 2020, sec. 3.1): rfftn over (T, H, W) of the latent-resolution features, a 1×1
  conv on [Re, Im], irfftn, added residually before the encoder head. Global, at the
  latent resolution, where a whole 4K frame is only 68×120 positions, so it never needs
  tiling.

Shapes: x_bcthw clips in [-1, 1] (an image x_bchw is a T = 1 clip; outputs keep its rank);
z_bcthw latents (T', H', W') = ceil((T, H, W) / (temporal, spatial, spatial)); inputs are
padded at the end of each axis to those multiples (time: the last frame repeated, so an
image is a still clip of one latent frame; space: zeros) and outputs cropped back.
Tiling (`tile_size` > 0, in pixels): the encoder and decoder trunks run on overlapping
windows blended with linear ramps (`tiling.py`); the quantizer, the FFT branch and the
encoder/decoder heads run on the whole latent map.

    model = PVQVAEConfig.from_dict({"flavour": "debug"}).build()
    x_hat, q = model(x_bcthw); loss = F.mse_loss(x_hat, x_bcthw) + q.loss  # + vqcore.losses
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqcore.models.blocks import (
    Decoder,
    Encoder,
    conv,
    group_stages,
    norm_layer,
    stage_strides,
)
from vqcore.models.config import TokenizerConfig
from vqcore.models.image_tokenizer import pad_to_multiple
from vqcore.models.tiling import tiled
from vqcore.quantizers import Quantized, build
from vqcore.quantizers.base import Codes
from vqcore.spectral import dwt, fft_features, filter_bank, ifft_features, wavelet_bank

__all__ = ["FLAVOURS", "PVQVAE", "PVQVAEConfig"]


@dataclass
class PVQVAEConfig(TokenizerConfig):
    name = "pvqvae"
    takes_clips = True

    in_channels: int = 3
    channels: int = 64  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 4, 8)  # one level per stage + 1
    num_res_blocks: int = 2
    latent_dim: int = 16  # d (seed 004 sec. 2.1)
    spatial_factor: int = 32  # H/32, W/32
    temporal_factor: int = 16  # T/16
    # "group" (VQGAN; its statistics are per tile when tiled) | "channel" (per-position
    # LayerNorm: local, so tiled = untiled away from tile borders, but with PVQ it stalled
    # for 600 of 800 CPU steps where group learned from the start: BENCHMARKS.md "Learning")
    norm: str = "group"
    norm_groups: int = 32
    dropout: float = 0.0
    # DC-AE's parameter-free residual shortcuts (blocks.py); BENCHMARKS.md "Learning"
    shortcuts: bool = True
    # 0: the decoder mirrors the encoder (a level per ×2 stage). n: n up-sampling blocks of
    # merged stages, each a channel projection (the first ResBlock's 1×1) + ResBlocks + up:
    # the supplement's "three decoder blocks, aided by projection layers" (sec. 2.1) is 3
    decoder_blocks: int = 0
    use_fft: bool = True  # FFT branch (global structure)
    use_dwt: bool = True  # wavelet branch (local detail)
    wavelet: str = "haar"  # any pywt wavelet name
    # registry spec without `dim` (filled with latent_dim); default PVQ = pyramid + LFQ
    quantizer: dict[str, Any] = field(
        default_factory=lambda: {"type": "pyramid", "inner": {"type": "lfq"}}
    )
    tile_size: int = 0  # pixels (multiple of spatial_factor); 0: never tile
    tile_overlap: int = 64  # pixels (multiple of spatial_factor)

    def __post_init__(self) -> None:
        self.check_trunk()
        strides = stage_strides(self.spatial_factor, self.temporal_factor, dims=3)
        if len(self.channel_mult) < len(strides) + 1:
            raise ValueError(
                f"pvqvae: factors ×{self.temporal_factor} (time), "
                f"×{self.spatial_factor} (space) need {len(strides) + 1} levels, "
                f"channel_mult has {len(self.channel_mult)}"
            )
        f = self.spatial_factor
        if self.tile_size < 0 or self.tile_size % f or self.tile_overlap % f:
            raise ValueError(
                f"pvqvae: tile_size ({self.tile_size}) and tile_overlap "
                f"({self.tile_overlap}) must be multiples of {f}"
            )
        if self.tile_size and not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(
                f"pvqvae: need 0 <= tile_overlap < tile_size, got "
                f"{self.tile_overlap}, {self.tile_size}"
            )
        if self.decoder_blocks:
            group_stages(strides, self.channel_mult, self.decoder_blocks)  # raises if too many
        if self.use_dwt:
            filter_bank(self.wavelet)  # an unknown name fails here, naming the wavelet

    def build(self) -> PVQVAE:
        return PVQVAE(self)


class FFTBranch(nn.Module):
    """h + W_out · irfftn(SiLU(W_f · [Re, Im](rfftn(W_in · SiLU(norm(h)))))), over (T, H, W).

    Spectral transform of Fast Fourier Convolution (Chi et al. 2020, sec. 3.1): a 1×1 conv in
    the frequency domain is a global mixing of all positions (seed 004 sec. 3.3: "FFT
    encodes global structural patterns"). W_out starts at zero, so the branch starts as
    the identity.
    """

    def __init__(self, channels: int, norm: str, groups: int):
        super().__init__()
        self.norm = norm_layer(norm, channels, groups)
        self.conv_in = conv(3, channels, channels, kernel=1)
        self.spectral = conv(3, 2 * channels, 2 * channels, kernel=1)
        self.conv_out = conv(3, channels, channels, kernel=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, h_bcthw: torch.Tensor) -> torch.Tensor:
        size = h_bcthw.shape[2:]
        u = self.conv_in(F.silu(self.norm(h_bcthw)))
        f = F.silu(self.spectral(fft_features(u, ndim=3)))  # (B, 2C, T, H, W//2+1)
        u = ifft_features(f, size).to(h_bcthw.dtype)
        return h_bcthw + self.conv_out(u)


class DWTBranch(nn.Module):
    """Sub-bands of a multi-level DWT of the input, projected and added after each encoder
    down-sampling stage (seed 004 sec. 3.3: "Wavelet encoding sharpens textures").

    Level l transforms the previous approximation along the axes stage l halves, so its
    sub-bands (B, 2^k·C_in, T_l, H_l, W_l) match the encoder's grid after stage l. Each level
    is scaled by 2^(−k/2) per transformed axis so the approximation stays a local mean.
    """

    def __init__(self, in_channels: int, widths: list[int], strides, wavelet: str):
        super().__init__()
        self.register_buffer("bank", wavelet_bank(wavelet).float(), persistent=False)  # (4, F)
        self.level_axes = [tuple(a - 3 for a, s in enumerate(st) if s == 2) for st in strides]
        self.proj = nn.ModuleList(
            conv(3, in_channels * 2 ** len(axes), width, kernel=1)
            for axes, width in zip(self.level_axes, widths)
        )

    def bands(self, x_bcthw: torch.Tensor) -> list[torch.Tensor]:
        out, approx = [], x_bcthw
        for axes in self.level_axes:
            c = dwt(approx, axes, self.bank) * 2 ** (-len(axes) / 2)  # (B, K, C, T, H, W)
            approx = c[:, 0]
            out.append(c.flatten(1, 2))
        return out

    def inject(self, bands: list[torch.Tensor], stage: int, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj[stage](bands[stage].to(h.dtype))


class PVQVAE(nn.Module):
    def __init__(self, config: PVQVAEConfig):
        super().__init__()
        self.config = c = config
        strides = stage_strides(c.spatial_factor, c.temporal_factor, dims=3)
        net = c.trunk(strides)
        self.encoder = Encoder(3, c.in_channels, c.latent_dim, **net)
        widths = [c.channels * m for m in c.channel_mult]
        self.fft = (
            FFTBranch(self.encoder.trunk_channels, c.norm, c.norm_groups) if c.use_fft else None
        )
        self.dwt = DWTBranch(c.in_channels, widths, strides, c.wavelet) if c.use_dwt else None
        self.quantizer = build(c.quantizer_config())
        if c.decoder_blocks:
            up, mult = group_stages(strides, c.channel_mult, c.decoder_blocks)
            net = {**net, "strides": up, "channel_mult": mult}
        self.decoder = Decoder(3, c.latent_dim, c.in_channels, **net)
        self.factors = (c.temporal_factor, c.spatial_factor, c.spatial_factor)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, for VQGAN's adaptive GAN weight (vqcore.losses)."""
        return self.decoder.conv_out.weight

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate a clip (B, C, T, H, W) or image (B, C, H, W); returns it as a clip."""
        c, f = self.config.in_channels, self.config.spatial_factor
        expected = f"a (B, {c}, T, H, W) clip or (B, {c}, H, W) image, float, with H, W >= {f}"
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected {expected}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected {expected}, got dtype {x.dtype}")
        if x.dim() not in (4, 5) or x.shape[1] != c or min(x.shape[-2:]) < f or 0 in x.shape:
            raise ValueError(f"{name}: expected {expected}, got shape {tuple(x.shape)}")
        return x if x.dim() == 5 else x.unsqueeze(2)

    def _tiling(self, height: int, width: int) -> bool:
        return 0 < self.config.tile_size < max(height, width)

    def _trunk(self, x_bcthw: torch.Tensor) -> torch.Tensor:
        if self.dwt is None:
            return self.encoder.trunk(x_bcthw)
        return self.encoder.trunk(x_bcthw, partial(self.dwt.inject, self.dwt.bands(x_bcthw)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Clip or image -> continuous latents z_bcthw (before quantization)."""
        x = self.check_input(x)
        pad_t = -x.shape[2] % self.factors[0]  # repeat the last frame: an image is a still clip
        if pad_t:
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, pad_t, -1, -1)], dim=2)
        x = pad_to_multiple(x, self.factors)
        c, f = self.config, self.config.spatial_factor
        if self._tiling(*x.shape[-2:]):
            h = tiled(self._trunk, x, c.tile_size, c.tile_overlap, Fraction(1, f), align=f)
        else:
            h = self._trunk(x)
        if self.fft is not None:
            h = self.fft(h)
        return self.encoder.head(h)

    def quantize(self, z_bcthw: torch.Tensor) -> Quantized:
        return self.quantizer(z_bcthw)

    def decode(self, z_q: torch.Tensor, size: tuple[int, ...] | None = None) -> torch.Tensor:
        """Quantized latents -> clip, cropped to `size` = (T, H, W), or (H, W) for an image
        (then the T axis is dropped)."""
        c, f = self.config, self.config.spatial_factor
        h = self.decoder.head(z_q)
        if self._tiling(h.shape[-2] * f, h.shape[-1] * f):
            x = tiled(self.decoder.trunk, h, c.tile_size // f, c.tile_overlap // f, f)
        else:
            x = self.decoder.trunk(h)
        if size is None:
            return x
        if len(size) == 2:
            return x[:, :, 0, : size[0], : size[1]]
        return x[..., : size[0], : size[1], : size[2]]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        q = self.quantize(self.encode(x))
        return self.decode(q.z_q, tuple(x.shape[2:])), q

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> Codes:
        """Codes of a clip or image; no codebook update or usage count."""
        return self.quantizer.encode(self.encode(x))

    @torch.no_grad()
    def detokenize(self, codes: Codes, size: tuple[int, ...] | None = None) -> torch.Tensor:
        return self.decode(self.quantizer.decode(codes), size)


FLAVOURS: dict[str, PVQVAEConfig] = {
    "default": PVQVAEConfig(),
    # CPU tests: ≤ 32 channels, time ×2, space ×4
    "debug": PVQVAEConfig(
        channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        spatial_factor=4,
        temporal_factor=2,
        norm_groups=8,
        tile_overlap=8,
    ),
}
PVQVAEConfig.flavours = FLAVOURS
