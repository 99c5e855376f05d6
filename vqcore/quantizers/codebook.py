"""`Codebook`: G codebooks of K codes of dim d over flat tokens, the core that vq, pq, rvq,
looc, hrvq and pyramid+vq share.

Learning rules (choose with `update`):
- "grad": codebook loss ||sg[x] - e||² + β ||x - sg[e]||² (VQ-VAE, arXiv:1711.00937, eq. 3).
- "ema":  N_k ← γN_k + (1-γ)n_k, m_k ← γm_k + (1-γ)Σ x, e_k = m_k / N_k with Laplace
          smoothing (VQ-VAE appendix A.1; Razavi et al. arXiv:1906.00446); loss β||x - sg[e]||².
Optional CVQ-VAE online re-anchoring (Zheng & Vedaldi, arXiv:2307.15139, eq. 7-8): running
usage p̄_k ← γp̄_k + (1-γ)n_k/N; α_k = exp(-p̄_k K 10 / (1-γ) - ε); e_k ← (1-α_k)e_k + α_k x̂_k,
where x̂_k is the feature closest to e_k ("closest") or a random feature ("random"). With G
codebooks this runs per codebook over the tokens searched in it; a codebook that got no token
in a batch (all ranks together) keeps its running usage and its codes. With "grad" codes the
moves go to a buffer, `anchor_shift`, and the codes are weight + anchor_shift: an optimizer
that keeps its own master copy of the weights (DeepSpeed ZeRO, FSDP, fp32 masters of bf16
weights) writes that copy back after every step and would undo a move made to the weight
itself. With Adam that is the same as moving the weight (its moments are kept either way).

Grouped search (`group_n`): each token is searched only in its own codebook. With the fused
kernel (CUDA + Triton, `VQCORE_FUSED`, see vqcore.ops.nearest) that is one launch for all
groups, tokens sorted by group on the device. Otherwise: one chunked matmul search per group
present where that costs less than gathering every token's codebook (pq's sub-spaces, the
first layers of an hrvq tree; the rule is `LOOP_COST_ELEMENTS`), else (many small groups, deep
hrvq layers, or under torch.compile: the split by group reads counts back to the host) each
token's codebook is gathered, chunked.

Distributed: batch statistics are all-reduced before any update, and re-anchored codes are
broadcast from rank 0, so every rank keeps the same codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqcore.ops import all_reduce_sum_, broadcast_, nearest_code, nearest_feature_per_code
from vqcore.ops.nearest import DEFAULT_BUDGET_ELEMENTS, use_fused
from vqcore.ops.triton_nearest import nearest_code_fused
from vqcore.quantizers.base import CodeUsage

UPDATES = ("grad", "ema")
DISTANCES = ("l2", "cosine")
ANCHORS = ("closest", "random")


class Codebook(nn.Module):
    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        num_groups: int = 1,
        beta: float = 0.25,
        update: str = "grad",
        ema_decay: float = 0.99,
        eps: float = 1e-5,
        distance: str = "l2",
        cvq: bool = False,
        cvq_anchor: str = "closest",
        cvq_decay: float = 0.99,
        raw_output: bool = False,
        owner: str = "codebook",
    ):
        super().__init__()
        for key, value, allowed in (
            ("update", update, UPDATES),
            ("distance", distance, DISTANCES),
            ("cvq_anchor", cvq_anchor, ANCHORS),
        ):
            if value not in allowed:
                raise ValueError(f"{owner}: {key} must be one of {allowed}, got {value!r}")
        self.num_codes, self.code_dim, self.num_groups = num_codes, code_dim, num_groups
        self.beta, self.update_rule, self.distance = beta, update, distance
        self.ema_decay, self.eps = ema_decay, eps
        self.cvq, self.cvq_anchor, self.cvq_decay = cvq, cvq_anchor, cvq_decay
        # cosine search, raw code out (see `forward`); with l2 the two are the same thing
        self.raw_output = raw_output and distance == "cosine"
        init = torch.empty(num_groups, num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes)
        if update == "grad":
            self.weight = nn.Parameter(init)
        else:
            self.register_buffer("weight", init)
            # N_k starts at 1 with m_k = e_k, so e_k = m_k / N_k holds from step 0 and a code no
            # token reaches keeps its value (from 0, m_k / N_k would blow up by ~1/eps)
            self.register_buffer("ema_size", torch.ones(num_groups, num_codes))
            self.register_buffer("ema_sum", init.clone())
        if cvq:
            self.register_buffer("usage_ema", torch.zeros(num_groups, num_codes))
            if update == "grad":
                self.register_buffer("anchor_shift", torch.zeros_like(init))
        self.usage = CodeUsage(num_codes, num_groups)

    @property
    def table(self) -> torch.Tensor:
        """(G, K, d) codes: the weight, plus CVQ's moves with "grad" codes (see module doc)."""
        shift = getattr(self, "anchor_shift", None)
        return self.weight if shift is None else self.weight + shift

    def codes_of(self, group: torch.Tensor | None) -> torch.Tensor:
        w = self.table if group is None else self.table[group]
        return F.normalize(w, dim=-1) if self.distance == "cosine" and not self.raw_output else w

    # -- search and lookup
    @torch.no_grad()
    def search(self, x_nd: torch.Tensor, group_n: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest code of each token, searched only in its own codebook `group_n`."""
        if group_n is None:
            if self.num_groups != 1:
                raise ValueError("Codebook.search: group_n is required with several codebooks")
            return nearest_code(x_nd, self.table[0], self.distance)[0]
        return _grouped_nearest(x_nd, self.codes_of(None), group_n, self.distance)

    def lookup(self, codes_n: torch.Tensor, group_n: torch.Tensor | None = None) -> torch.Tensor:
        flat = codes_n if group_n is None else group_n * self.num_codes + codes_n
        return self.codes_of(None).reshape(-1, self.code_dim)[flat]

    # -- training step
    def forward(
        self, x_nd: torch.Tensor, group_n: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (N, d) -> (e (N, d) with gradient to the codebook in "grad" mode, codes (N,),
        loss, this batch's (G, K) histogram). No straight-through here: callers add it.

        Cosine distance: tokens and codes are compared as unit vectors. By default the code out
        and the losses are the unit vectors too (ViT-VQGAN, arXiv:2110.04627, sec. 3.2); with
        `raw_output` the code out, the losses and the updates use the raw code and token, as
        CVQ-VAE's and LooC's public code do (Visual-AI/LooC `quantise.py`: the match by
        cosine, then `z_q = embedding.weight[indices]`)."""
        unit = F.normalize(x_nd, dim=-1) if self.distance == "cosine" else x_nd
        x_nd = x_nd if self.raw_output else unit
        codes = self.search(unit, group_n)
        sync = self.training
        hist = self.usage.update(codes, group_n, sync=sync)
        e = self.lookup(codes, group_n)
        commit = F.mse_loss(x_nd, e.detach())
        if self.update_rule == "grad":
            loss = F.mse_loss(e, x_nd.detach()) + self.beta * commit
        else:
            loss = self.beta * commit
        if self.training:
            if self.update_rule == "ema":
                self._ema_update(x_nd.detach(), codes, group_n, hist)
            if self.cvq:
                self._reanchor(x_nd.detach(), group_n, hist)
        return e, codes, loss, hist

    @torch.no_grad()
    def _ema_update(self, x_nd, codes, group_n, hist) -> None:
        flat = codes if group_n is None else group_n * self.num_codes + codes
        sums = torch.zeros(self.num_groups * self.num_codes, self.code_dim, device=x_nd.device)
        sums.index_add_(0, flat, x_nd.float())
        all_reduce_sum_(sums)  # hist is already summed over ranks
        gamma = self.ema_decay
        self.ema_size.mul_(gamma).add_(hist, alpha=1 - gamma)
        self.ema_sum.mul_(gamma).add_(sums.view_as(self.ema_sum), alpha=1 - gamma)
        n = self.ema_size.sum(-1, keepdim=True)
        size = (self.ema_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.weight.copy_(self.ema_sum / size.unsqueeze(-1))

    @torch.no_grad()
    def _reanchor(
        self, x_nd: torch.Tensor, group_n: torch.Tensor | None, hist: torch.Tensor
    ) -> None:
        gamma = self.cvq_decay
        total = hist.sum(1, keepdim=True)  # (G, 1), summed over ranks
        probs = hist / total.clamp_min(1)
        moved = self.usage_ema.mul(gamma).add_(probs, alpha=1 - gamma)
        self.usage_ema.copy_(torch.where(total > 0, moved, self.usage_ema))  # unseen: keep
        alpha = torch.exp(-self.usage_ema * self.num_codes * 10 / (1 - gamma) - 1e-3)  # (G, K)
        w = self.table.detach()
        target = getattr(self, "anchor_shift", self.weight.data)  # where the moves are kept
        for g, x_g in _tokens_by_group(x_nd, group_n, self.num_groups):
            if self.cvq_anchor == "closest":
                anchors = nearest_feature_per_code(x_g, w[g], DEFAULT_BUDGET_ELEMENTS)
            else:
                pick = torch.randint(0, x_g.shape[0], (self.num_codes,), device=x_nd.device)
                anchors = x_g[pick]
            # e ← (1 - α) e + α x̂, i.e. e += α (x̂ - e)
            target[g] += alpha[g, :, None] * (anchors.to(w.dtype) - w[g])
        broadcast_(target)  # anchors are rank-local features: rank 0's choice wins everywhere
        if self.update_rule == "ema":
            # keep the EMA state consistent with the moved codes
            self.ema_sum.copy_(self.weight * self.ema_size.clamp_min(self.eps).unsqueeze(-1))


# Group by group, or each token's codebook gathered? A search group by group pays a fixed cost
# per group present (the split on the host, a few small kernels), the gathered search copies
# every token's codebook (n·K·d elements). Loop while groups × LOOP_COST_ELEMENTS <= n·K·d,
# the cost of a group in gathered elements. CPU, measured on this project's 2-core machine
# (~55 µs a group, ~1.5 ns an element): hrvq 90 groups × 90 codes, D 256, 1,024 tokens: loop
# 6 ms, gather 31 ms; 1,024 groups × 16 codes, D 64, 1,024 tokens: loop 28 ms, gather 1.5 ms.
# CUDA without Triton, estimated: ~60 µs of launches and a sync a group, ~4 ps an element.
LOOP_COST_ELEMENTS = {"cpu": 1 << 15, "cuda": 1 << 23}


def _split_by_group(group_n: torch.Tensor, num_groups: int) -> tuple[list[int], tuple]:
    """Groups present (ascending) and, for each, the indices of its tokens (one host sync)."""
    counts = torch.bincount(group_n, minlength=num_groups)
    present = counts.nonzero().flatten()
    order = torch.argsort(group_n, stable=True)
    return present.tolist(), order.split(counts[present].tolist())


def _tokens_by_group(x_nd: torch.Tensor, group_n: torch.Tensor | None, num_groups: int):
    """Yield (group, its tokens (n_g, d)) for every group with at least one token."""
    if group_n is None:
        yield 0, x_nd
        return
    groups, indices = _split_by_group(group_n, num_groups)
    for g, idx in zip(groups, indices):
        yield g, x_nd[idx]


def _grouped_nearest(
    x_nd: torch.Tensor,
    codebooks_gkd: torch.Tensor,
    group_n: torch.Tensor,
    distance: str,
    budget_elements: int = DEFAULT_BUDGET_ELEMENTS,
    by_group: bool | None = None,
) -> torch.Tensor:
    """Nearest code of token n within codebook group_n[n] only, never the (N, G·K) distances.

    Fused (see `use_fused`): one kernel launch over all groups. Otherwise `by_group` (None:
    by `LOOP_COST_ELEMENTS`): one `nearest_code` matmul search per group present, or each
    token's codebook gathered, chunked so at most `budget_elements` entries are held (always
    under torch.compile, which cannot trace the split).
    """
    if use_fused(x_nd):
        return nearest_code_fused(x_nd, codebooks_gkd, distance, group_n=group_n)[0]
    g, k, d = codebooks_gkd.shape
    n = x_nd.shape[0]
    codes = torch.empty(n, dtype=torch.long, device=x_nd.device)
    if torch.compiler.is_compiling():
        by_group = False  # the split reads counts back to the host: compiled, gather (one graph)
    split = None if by_group is False else _split_by_group(group_n, g)
    if by_group is None:
        cost = LOOP_COST_ELEMENTS.get(x_nd.device.type, LOOP_COST_ELEMENTS["cuda"])
        by_group = len(split[0]) * cost <= n * k * d
    if by_group:
        for grp, idx in zip(*split):
            codes[idx] = nearest_code(
                x_nd[idx], codebooks_gkd[grp], distance, budget_elements, fused=False
            )[0]
        return codes
    step = max(1, budget_elements // (k * d))
    codebooks = codebooks_gkd.float()
    if distance == "cosine":
        codebooks = F.normalize(codebooks, dim=-1)
    e_sq = codebooks.pow(2).sum(-1)  # (G, K)
    for start in range(0, n, step):
        x = x_nd[start : start + step].float()
        if distance == "cosine":
            x = F.normalize(x, dim=-1)
        grp = group_n[start : start + step]
        # ||e||² - 2 e·x as in nearest_code (||x||² does not move the argmin); (n, K, d) gathered
        dist = torch.baddbmm(e_sq[grp].unsqueeze(-1), codebooks[grp], x.unsqueeze(-1), alpha=-2.0)
        codes[start : start + step] = dist.squeeze(-1).argmin(-1)
    return codes
