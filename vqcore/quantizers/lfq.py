"""`lfq`: lookup-free quantization (MAGVIT-v2, Yu et al., arXiv:2310.05737, sec. 3.1).

The codebook is implicit: C = {-1, 1}^d (d = `codebook_dim`, K = 2^d codes), so

    q(x)_i = sign(x_i) = -1{x_i <= 0} + 1{x_i > 0}                  (eq. 3)
    Index(x) = Σ_{i=0}^{d-1} 2^i · 1{x_i > 0}                       (eq. 4; bit i = channel i)

with a straight-through gradient. When `dim != codebook_dim`, 1×1 projections map C -> d before
and d -> C after quantization. By default d = min(dim, 18): a 2^18 = 262,144-code codebook,
Open-MAGVIT2's (arXiv:2409.04410), so any width builds and trains (dim 32 or 256 would
otherwise ask for 2^32 or 2^256 codes); vector-quantize-pytorch's LFQ projects the same way
when dim != log2 K.

Loss = beta · ‖x - sg[q(x)]‖² + entropy_weight · (E_n[H(q(c|x_n))] - γ · H(E_n[q(c|x_n)]))   (eq. 5)

with the soft assignment q(c|x) ∝ exp(-‖x - c‖² / τ) over all 2^d codes (τ = `temperature`,
γ = `diversity_gamma`): the per-sample entropy is pushed down (confident codes) and the entropy
of the batch-averaged assignment pushed up (every code used).

No N × 2^d tensor is ever built. Since ‖x - c‖² = ‖x‖² + d - 2 x·c, q(c|x) factorises over
channels: q(c|x) = Π_i p_i(c_i) with p_i(+1) = σ(4 x_i / τ). Hence
- per-sample entropy = Σ_i h(p_i), exact (h the binary entropy);
- batch entropy: the batch average Q(c) = (1/N) Σ_n Π_i p_ni(c_i) is NOT a product, but splitting
  the bits into a low half a and a high half b gives Q = Aᵀ B / N with A (N, 2^|a|) and
  B (N, 2^|b|) the per-half code probabilities, so H(Q) is exact at a cost of N·(2^|a| + 2^|b|)
  + 2^d floats (d = 16, N = 4096: about 9 MB).
- for d > `entropy_group_bits` the bits are cut into ceil(d / g) groups and the batch entropy is
  the sum of the groups' exact entropies: an upper bound on H(Q) (subadditivity, H(X, Y) <=
  H(X) + H(Y)), equal to it when the groups are independent under Q.

Usage counters: one counter per code while d <= 20 (2^20 floats). For larger d the per-code
histogram is skipped: the counters hold, per bit, how often it was -1 / +1 (G = d codebooks of
2 codes), batch usage/perplexity are computed exactly from the batch's distinct codes, and
`metrics["usage_per_bit_only"] = 1`.

Shapes: z (B, C, *S) -> tokens (N, C) -> (N, d); codes (B, *S) int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vqcore.ops.counts import run_lengths
from vqcore.quantizers.base import (
    CodeUsage,
    Quantized,
    Quantizer,
    QuantizerConfig,
    from_tokens,
    straight_through,
    to_tokens,
)
from vqcore.quantizers.registry import register

MAX_HISTOGRAM_BITS = 20  # per-code usage counters up to 2^20 codes
DEFAULT_MAX_BITS = 18  # default d for wide latents (Open-MAGVIT2's 2^18 codes)
MAX_CODE_BITS = 63  # codes are int64


@dataclass
class LFQConfig(QuantizerConfig):
    type: ClassVar[str] = "lfq"
    # d, K = 2^d codes; None: d = min(dim, DEFAULT_MAX_BITS) (projections when d < dim)
    codebook_dim: int | None = None
    beta: float = 0.25  # commitment weight
    entropy_weight: float = 0.1  # weight of the entropy term (eq. 5)
    diversity_gamma: float = 1.0  # γ: weight of the batch (codebook) entropy inside it
    temperature: float = 0.01  # τ of the soft assignment q(c|x) ∝ exp(-‖x - c‖²/τ)
    entropy_group_bits: int = 20  # batch entropy exact up to this many bits (see module doc)

    @property
    def bits(self) -> int:
        if self.codebook_dim is None:
            return min(self.dim, DEFAULT_MAX_BITS)
        return self.codebook_dim

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.bits <= MAX_CODE_BITS:
            raise ValueError(
                f"lfq: codebook_dim must be in [1, {MAX_CODE_BITS}] (int64 codes), got "
                f"{self.bits}; set codebook_dim to project dim={self.dim} down"
            )
        if self.temperature <= 0 or self.entropy_group_bits < 1:
            raise ValueError("lfq: temperature must be > 0 and entropy_group_bits >= 1")
        if min(self.beta, self.entropy_weight, self.diversity_gamma) < 0:
            raise ValueError("lfq: beta, entropy_weight and diversity_gamma must be >= 0")


def _code_probs(log_neg: torch.Tensor, log_pos: torch.Tensor) -> torch.Tensor:
    """Per-bit log-probabilities (N, b) -> probabilities of all 2^b codes (N, 2^b), index
    Σ_i 2^i c_i as in eq. 4."""
    b = log_neg.shape[1]
    i = torch.arange(b, device=log_neg.device)
    bits = ((torch.arange(2**b, device=log_neg.device)[:, None] >> i) & 1).to(log_neg.dtype)
    return (log_neg @ (1 - bits).t() + log_pos @ bits.t()).exp()


def _batch_entropy_exact(log_neg: torch.Tensor, log_pos: torch.Tensor) -> torch.Tensor:
    """H((1/N) Σ_n Π_i p_ni) over b bits, via the low/high split Q = Aᵀ B / N."""
    lo = (log_neg.shape[1] + 1) // 2
    a = _code_probs(log_neg[:, :lo], log_pos[:, :lo])  # (N, 2^lo)
    if lo == log_neg.shape[1]:
        q = a.mean(0)
    else:
        b = _code_probs(log_neg[:, lo:], log_pos[:, lo:])  # (N, 2^hi)
        q = a.t() @ b / log_neg.shape[0]  # (2^lo, 2^hi): Q[c_lo, c_hi]
    return -(q * q.clamp_min(1e-30).log()).sum()


def lfq_entropies(
    x_nd: torch.Tensor, temperature: float, group_bits: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-sample entropy, batch entropy) of q(c|x) ∝ exp(-‖x - c‖²/τ) over {-1, 1}^d,
    in nats, without an N × 2^d tensor (see the module docstring). Always fp32 (or fp64), also
    under autocast: the batch average sums N small products."""
    x = x_nd if x_nd.dtype == torch.float64 else x_nd.float()
    with torch.autocast(x.device.type, enabled=False):
        logit = 4 * x / temperature  # p_i(+1) = σ(4 x_i / τ)
        log_pos, log_neg = F.logsigmoid(logit), F.logsigmoid(-logit)
        per_sample = -(log_pos.exp() * log_pos + log_neg.exp() * log_neg).sum(1).mean()
        d = x.shape[1]
        num_groups = -(-d // group_bits)
        bounds = [round(g * d / num_groups) for g in range(num_groups + 1)]
        batch = sum(
            _batch_entropy_exact(log_neg[:, s:e], log_pos[:, s:e])
            for s, e in zip(bounds[:-1], bounds[1:])
        )
    return per_sample, batch


@register(LFQConfig)
class LookupFreeQuantizer(Quantizer):
    def __init__(self, config: LFQConfig):
        super().__init__(config)
        d = config.bits
        self.codebook_dim = d
        if d != config.dim:
            self.project_in, self.project_out = nn.Linear(config.dim, d), nn.Linear(d, config.dim)
        else:
            self.project_in = self.project_out = None
        self.register_buffer("bit_values", 2 ** torch.arange(d, dtype=torch.long), persistent=False)
        self.per_code_usage = d <= MAX_HISTOGRAM_BITS
        self.usage = CodeUsage(2**d) if self.per_code_usage else CodeUsage(2, d)

    @property
    def bits_per_token(self) -> float:
        return float(self.codebook_dim)

    def quantize(self, z: torch.Tensor) -> Quantized:
        c = self.config
        x, spatial = to_tokens(z)
        if self.project_in is not None:
            x = self.project_in(x)
        positive = x > 0
        q = torch.where(positive, 1.0, -1.0).to(x.dtype)  # eq. 3
        codes = (positive.long() * self.bit_values).sum(-1)  # eq. 4
        commit = F.mse_loss(x, q.detach())
        per_sample, batch = lfq_entropies(x, c.temperature, c.entropy_group_bits)
        entropy = per_sample - c.diversity_gamma * batch  # eq. 5
        loss = c.beta * commit + c.entropy_weight * entropy
        x_q = straight_through(x, q)
        if self.project_out is not None:
            x_q = self.project_out(x_q)
        metrics = {
            **self._count(codes, positive),
            "commitment": commit.detach(),
            "entropy_per_sample": per_sample.detach(),
            "entropy_batch": batch.detach(),
        }
        return Quantized(from_tokens(x_q, spatial), codes.view(spatial), loss, metrics)

    def _count(self, codes_n: torch.Tensor, positive_nd: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.per_code_usage:
            return CodeUsage.stats(self.usage.update(codes_n, sync=self.training))
        bit = torch.arange(self.codebook_dim, device=codes_n.device).expand_as(positive_nd)
        self.usage.update(positive_nd.long(), bit, sync=self.training)
        counts = run_lengths(codes_n)
        p = counts / counts.sum()
        return {
            "usage": (counts > 0).sum() / 2.0**self.codebook_dim,
            "perplexity": (-(p * p.clamp_min(1e-12).log()).sum()).exp(),
            "usage_per_bit_only": torch.tensor(1.0),
        }

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        flat = codes.reshape(-1, 1)
        x = torch.where((flat & self.bit_values) > 0, 1.0, -1.0)  # eq. 3 from the bits of eq. 4
        if self.project_out is not None:
            x = self.project_out(x.to(self.project_out.weight.dtype))
        return from_tokens(x, codes.shape)
