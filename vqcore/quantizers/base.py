"""The one interface every vqcore quantizer implements.

Shape legend: B batch, C channels (= `dim`), S spatial positions ((H, W) or (T, H, W)),
N = B·prod(S) tokens, K codes per codebook, G codebooks.

    q = build({"type": "vq", "dim": 64})
    out = q(z_bcs)                 # Quantized(z_q, codes, loss, metrics); z_q has z's shape
    codes = q.encode(z_bcs)        # integer tensor (or tuple of them, per level/scale)
    z_q = q.decode(codes)          # eval mode: exactly out.z_q
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vqcore.ops import all_reduce_sum_
from vqcore.ops.counts import bincount

Codes = torch.Tensor | tuple[torch.Tensor, ...]

CHECK_FINITE_ENV = "VQCORE_CHECK_FINITE"


def check_finite_enabled() -> bool:
    """Whether `check_input` tests z for NaN/inf: on unless VQCORE_CHECK_FINITE=0 (read at
    every call), and never while torch.compile traces. The test reads z back on the host,
    one sync per forward on a GPU: the benchmarks turn it off. A caller that checks z itself
    turns it off for one quantizer instead (`Quantizer.check_finite`): vqtok's trainer, whose
    all-reduced check of the latents runs first (`pipelines/training/objectives.py`)."""
    if os.environ.get(CHECK_FINITE_ENV, "1").strip() == "0":
        return False
    return not torch.compiler.is_compiling()


@dataclass
class Quantized:
    """What every quantizer returns.

    z_q: same shape as the input, straight-through gradient to it.
    codes: int64 tensor(s) that `decode` maps back to `z_q` (eval mode).
    loss: scalar of the quantizer's own terms (codebook, commitment, entropy, ...), weighted.
    metrics: detached scalars: `usage` (fraction of codes used in this batch), `perplexity`,
        `bits_per_token` (bits per latent position), plus family-specific ones.
    """

    z_q: torch.Tensor
    codes: Codes
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class QuantizerConfig:
    """Base of every quantizer config; `dim` is the channel count C of the input."""

    dim: int = 0
    type: ClassVar[str] = ""

    def validate(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"{self.type}: 'dim' must be a positive channel count, got {self.dim}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


# --- channel-first <-> tokens: the only place the layout changes -------------------------


def to_tokens(z_bcs: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """(B, C, *S) -> ((N, C), (B, *S)). Keeps a view when possible."""
    spatial = torch.Size((z_bcs.shape[0], *z_bcs.shape[2:]))
    return z_bcs.movedim(1, -1).reshape(-1, z_bcs.shape[1]), spatial


def from_tokens(x_nc: torch.Tensor, spatial: torch.Size) -> torch.Tensor:
    """((N, C), (B, *S)) -> (B, C, *S)."""
    return x_nc.reshape(*spatial, x_nc.shape[-1]).movedim(-1, 1)


def channels_last(z_bcs: torch.Tensor) -> torch.Tensor:
    """z with its channels last in memory (same shape and values), so that `to_tokens` of it
    and of what elementwise ops make from it is a view; a no-op when it already is."""
    last = z_bcs.movedim(1, -1)
    return z_bcs if last.is_contiguous() else last.contiguous().movedim(-1, 1)


def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Forward value z_q, gradient of identity to z (VQ-VAE, arXiv:1711.00937, sec. 3.1):
    what `z + (z_q - z).detach()` means, without its two passes or its rounding of z_q."""
    return add_scaled_identity(z_q.detach(), z, 1.0)


def add_scaled_identity(value: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
    """`value + scale·(z - sg[z])`: the value of `value` (in the dtype promoted with z's),
    with `scale` times the output's gradient added to z's. The term has value 0 and Jacobian
    scale·I; written out it costs two passes over the tensors, here none."""
    return _AddScaledIdentity.apply(value, z, scale)


class _AddScaledIdentity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.dtypes = scale, (value.dtype, z.dtype)
        return value.to(torch.promote_types(value.dtype, z.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        to_value, to_z, _ = ctx.needs_input_grad
        g_value = grad.to(ctx.dtypes[0]) if to_value else None
        g_z = None
        if to_z and ctx.scale != 0:
            g_z = (grad if ctx.scale == 1 else grad * ctx.scale).to(ctx.dtypes[1])
        return g_value, g_z, None


# --- code usage: histogram counters, synced across ranks -----------------------------------


class CodeUsage(nn.Module):
    """Per-code counts of G codebooks of K codes, accumulated over calls.

    In training mode each batch's histogram is summed over ranks before it is added, so the
    counters (and anything derived from them, e.g. EMA statistics) are identical on every
    rank. In eval mode counts stay local; call `all_reduce()` once at the end of an eval.
    """

    def __init__(self, num_codes: int, num_codebooks: int = 1):
        super().__init__()
        self.num_codes, self.num_codebooks = num_codes, num_codebooks
        self.counting = True  # False inside `Quantizer.encode`, which must have no side effects
        self.register_buffer("counts", torch.zeros(num_codebooks, num_codes), persistent=True)

    @torch.no_grad()
    def histogram(
        self, codes_n: torch.Tensor, group_n: torch.Tensor | None = None, sync: bool = False
    ) -> torch.Tensor:
        """Codes (N,) of codebook `group_n` (N,) (default 0) -> (G, K) float counts of this
        batch, summed over ranks if `sync`."""
        flat = codes_n.reshape(-1)
        if group_n is not None:
            flat = flat + group_n.reshape(-1) * self.num_codes
        size = self.num_codebooks * self.num_codes
        hist = bincount(flat, size, self.counts.dtype).view(self.num_codebooks, self.num_codes)
        return all_reduce_sum_(hist) if sync else hist

    @torch.no_grad()
    def update(
        self, codes_n: torch.Tensor, group_n: torch.Tensor | None = None, sync: bool = False
    ) -> torch.Tensor:
        """Count a batch; returns its (G, K) histogram (all-reduced if `sync`)."""
        hist = self.histogram(codes_n, group_n, sync)
        if self.counting:
            self.counts += hist
        return hist

    def reset(self) -> None:
        self.counts.zero_()

    def all_reduce(self) -> None:
        all_reduce_sum_(self.counts)

    @staticmethod
    def stats(hist_gk: torch.Tensor) -> dict[str, torch.Tensor]:
        """usage = mean fraction of codes with a count; perplexity = mean exp(entropy)."""
        total = hist_gk.sum(1, keepdim=True).clamp_min(1)
        p = hist_gk / total
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
        return {
            "usage": (hist_gk > 0).float().mean(),
            "perplexity": entropy.exp().mean(),
        }


# --- the base module -------------------------------------------------------------------------


class Quantizer(nn.Module):
    """Base class: input checks, the `encode`/`decode` pair, usage counters and export.

    Subclasses implement `quantize(z_bcs) -> Quantized` (z already validated) and
    `decode(codes) -> z_q`, and set `self.usage` (a CodeUsage) and `bits_per_token`.
    """

    config: QuantizerConfig
    usage: CodeUsage

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.dim = config.dim
        # NaN/inf test of z in `check_input` (a host sync): off where the caller checks z
        self.check_finite = True

    # -- subclass API
    def quantize(self, z: torch.Tensor) -> Quantized:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, codes: Codes) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def bits_per_token(self) -> float:
        """Bits one latent position costs (sum over sub-vectors/levels/scales)."""
        return math.log2(self.usage.num_codes) * self.usage.num_codebooks

    # -- public API
    def forward(self, z: torch.Tensor) -> Quantized:
        self.check_input(z)
        out = self.quantize(z)
        out.metrics.setdefault("bits_per_token", torch.tensor(float(self.bits_per_token)))
        return out

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> Codes:
        """Codes of z with no side effects (no codebook update, no usage count)."""
        self.check_input(z)
        was_training = self.training
        counters = [m for m in self.modules() if isinstance(m, CodeUsage)]
        self.eval()
        for m in counters:
            m.counting = False
        try:
            return self.quantize(z).codes
        finally:
            for m in counters:
                m.counting = True
            self.train(was_training)

    def reset_usage(self) -> None:
        for m in self.modules():
            if isinstance(m, CodeUsage):
                m.reset()

    def all_reduce_usage(self) -> None:
        for m in self.modules():
            if isinstance(m, CodeUsage):
                m.all_reduce()

    def usage_stats(self) -> dict[str, float]:
        """Usage and perplexity over everything counted since the last reset."""
        return {k: float(v) for k, v in CodeUsage.stats(self.usage.counts).items()}

    def check_input(self, z: torch.Tensor) -> None:
        name = type(self).__name__
        expected = f"(B, {self.dim}, H, W) or (B, {self.dim}, T, H, W) float tensor"
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"{name}: expected a {expected}, got {type(z).__name__}")
        if not z.is_floating_point():
            raise ValueError(f"{name}: expected a {expected}, got dtype {z.dtype}")
        if z.dim() not in (4, 5):
            raise ValueError(f"{name}: expected a {expected}, got shape {tuple(z.shape)}")
        if z.shape[1] != self.dim:
            raise ValueError(
                f"{name}: expected {self.dim} channels in a {expected}, got shape {tuple(z.shape)}"
            )
        if self.check_finite and check_finite_enabled() and not torch.isfinite(z).all():
            raise ValueError(f"{name}: input contains NaN or inf (shape {tuple(z.shape)})")

    # -- export
    def codebook_tensors(self) -> dict[str, torch.Tensor]:
        """Named codebook tensors for export; default: every parameter and buffer."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def export_codebook(self, directory: str | Path) -> list[Path]:
        """Write `codebook.pt` (tensors) and `codebook.json` (config, shapes, per-code usage)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.codebook_tensors()
        pt, js = directory / "codebook.pt", directory / "codebook.json"
        torch.save(tensors, pt)
        info = {
            "config": self.config.to_dict(),
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "bits_per_token": self.bits_per_token,
            "usage": self.usage_stats(),
            "counts": self.usage.counts.cpu().tolist(),
        }
        js.write_text(json.dumps(info, indent=1))
        return [pt, js]
