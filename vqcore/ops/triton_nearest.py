"""Fused nearest-code search in Triton: distances and argmin in one kernel, never N x K.

For tokens x (N, D) and a codebook e (K, D) (or G codebooks (G, K, D) with a codebook index
per token) the kernel computes

    k*(n) = argmin_k ||x_n - e_k||² = argmin_k (||e_k||² - 2 x_n·e_k)     (||x_n||² is constant)

tiled as a matmul: a program owns BLOCK_N rows of x, walks the codebook BLOCK_K codes at a
time, accumulates x·eᵀ over D in BLOCK_D slices with `tl.dot` (fp32 accumulator), and keeps a
running (min, argmin) per row in registers. Only N codes and N minima are written; the
(BLOCK_N, BLOCK_K) tile never leaves the SM. When there are too few blocks of rows to fill
the GPU (few rows, many codes: CVQ's closest feature of each of 256 codes among millions of
features), the codebook is also cut into S slices, split-K style: a second grid axis, each
program writes its slice's (min, argmin), and torch reduces the N x S results after.

Precision. Operands are rounded once, before the search, by a one-pass kernel that also sums
each rounded row's squares (`vqcore.ops.triton_operands`): bf16/fp16 inputs keep their dtype (the fp32 codebook
is rounded to it), fp32 inputs are rounded to tf32 (as `round_to_tf32`, the torch reference,
so a tf32 `tl.dot` sees them unchanged) or kept exact ("ieee"). ||e||² is taken of the rounded
codebook, so each score ||ẽ||² - 2 x̃·ẽ is the exact distance between the rounded points
(minus ||x̃||²) up to fp32 accumulation; its error is then at most about 2u·||x - e||·(||x|| +
||e||) for unit roundoff u, small for the near codes that compete (rounding e alone in ||e||²
but not in the dot costs ~10x more disagreements on real latents). Near-ties inside that band
can still swap, so by default (`rerank`, on unless the operands are exact fp32) each row keeps
its two best codes and the epilogue picks between them by exact fp32 ||x - e||², read from the
fp32 codebook. Measured under the interpreter (tests/test_ops_fused.py, N = 4096, K = 300,
random D = 8, 32 and astronaut patches D = 48): without the re-rank tf32 agrees with exact
search on 99.90-99.98 % of tokens and bf16 on 99.59-99.71 % (and 100 % with exact search of
the rounded operands); with it, 100 % in all nine cases. A code can differ from exact search
only when the exact best is not in the rounded top 2, i.e. at least two other codes are within
the rounding band of it. Exact ties go to the lowest index (strict `<` across tiles, leftmost
index inside a tile, lower index in the re-rank, the first slice in the split's reduction), as
`torch.argmin` does.

Grouped search (HR-VQ children, PQ sub-spaces): tokens are sorted by codebook index on the
device (stable argsort + fixed-size counts + cumsum, no host sync) and cut into blocks that
each hold tokens of one codebook only, like a grouped GEMM; the grid is the upper bound
ceil(N / BLOCK_N) + G and blocks past the end run no codebook tile.

Under torch.compile the operand pass and the launch are custom ops
(`vqcore::nearest_code_operands`, `vqcore::nearest_code_launch`) and the torch around them
(the grouped sort, the metric) is traced: a quantizer's training forward is one graph with the
fused search inside it.

Triton is optional (`vqcore.ops.triton_runtime`): without it `vqcore` runs on torch alone.
Under `TRITON_INTERPRET=1` the same kernel runs on CPU tensors with numpy (tests, no GPU);
there bf16 operands are widened to fp32 before `tl.dot` because the interpreter multiplies
bf16 bit patterns as integers (triton-lang/triton#11584). That widening is exact (a product of
two bf16 values fits in an fp32 mantissa), so the interpreter computes what the GPU's bf16
dot with fp32 accumulation computes, up to summation order.
"""

import torch
from torch.utils.flop_counter import register_flop_formula

from vqcore.ops.counts import bincount
from vqcore.ops.triton_operands import operand_dtype, operands
from vqcore.ops.triton_runtime import available, block_d, can_run, jit, tl, triton

BLOCK_N = 64  # rows of x per program
BLOCK_K = 64  # codes per tile
PRECISIONS = ("tf32", "ieee")


if triton is not None:

    def _nearest_kernel(
        x_ptr,  # (N, D) operand dtype, contiguous
        e_ptr,  # (G, K, D) operand dtype, contiguous
        esq_ptr,  # (G, K) fp32: ||e||² of the operand codebook
        xr_ptr,  # (N, D) x for the exact re-rank (fp32, or the input's bf16/fp16)
        er_ptr,  # (G, K, D) fp32 codebook for the exact re-rank
        order_ptr,  # (N,) int64: token ids sorted by codebook (GROUPED only)
        block_group_ptr,  # (num_blocks,) int64: codebook of each block (GROUPED only)
        block_start_ptr,  # (num_blocks,) int64: first sorted position of each block
        block_end_ptr,  # (num_blocks,) int64: end of the block's codebook run
        best_ptr,  # (N, S) fp32 out: RERANK: ||x - e||², else min_k ||e_k||² - 2 x·e_k
        code_ptr,  # (N, S) int64 out: argmin
        N,
        K,
        D,
        K_PER_SPLIT,  # codes searched by one program: split s owns [s·K_PER_SPLIT, +K_PER_SPLIT)
        GROUPED: tl.constexpr,
        RERANK: tl.constexpr,  # keep the 2 best codes, pick between them in exact fp32
        WIDEN: tl.constexpr,  # interpreter: widen operands to fp32 before tl.dot
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)  # which slice of the codebook (split-K over codes)
        num_splits = tl.num_programs(1)
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        lanes = tl.arange(0, BLOCK_N)
        if GROUPED:
            group = tl.load(block_group_ptr + pid)
            start = tl.load(block_start_ptr + pid)
            end = tl.load(block_end_ptr + pid)
            pos = start + lanes
            row_ok = pos < end
            rows = tl.load(order_ptr + pos, mask=row_ok, other=0)
            k_stop = tl.where(start < end, k_hi, k_lo)  # blocks past the last token: nothing
            group_codes = group.to(tl.int64) * K  # first code of this block's codebook
        else:
            rows = pid * BLOCK_N + lanes
            row_ok = rows < N
            k_stop = k_hi
            group_codes = 0
        rows = rows.to(tl.int64)
        e_base = e_ptr + group_codes * D
        inf = float("inf")
        best = tl.full((BLOCK_N,), inf, tl.float32)  # running best score and code
        best_k = tl.zeros((BLOCK_N,), tl.int64) + k_lo
        second = tl.full((BLOCK_N,), inf, tl.float32)  # running second best (RERANK)
        second_k = tl.zeros((BLOCK_N,), tl.int64) + k_lo
        dd = tl.arange(0, BLOCK_D)
        cols = tl.arange(0, BLOCK_K)
        for k0 in range(k_lo, k_stop, BLOCK_K):
            kk = k0 + cols
            k_ok = kk < k_hi
            acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_ok = (d0 + dd) < D
                xt = tl.load(
                    x_ptr + rows[:, None] * D + (d0 + dd)[None, :],
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                et = tl.load(  # (BLOCK_D, BLOCK_K): codes as columns
                    e_base + kk[None, :].to(tl.int64) * D + (d0 + dd)[:, None],
                    mask=k_ok[None, :] & d_ok[:, None],
                    other=0.0,
                )
                if WIDEN:
                    xt = xt.to(tl.float32)
                    et = et.to(tl.float32)
                acc = tl.dot(xt, et, acc, input_precision=PRECISION)
            esq = tl.load(esq_ptr + group_codes + kk, mask=k_ok, other=inf)
            score = esq[None, :] - 2.0 * acc  # ||e||² - 2 x·e; padded codes stay +inf
            t1, i1 = tl.min(score, axis=1, return_indices=True)  # leftmost on ties
            k1 = k0 + i1.to(tl.int64)
            # strict <: an exact tie keeps the earlier tile's (lower) code
            new_first = t1 < best
            if RERANK:
                t2, i2 = tl.min(
                    tl.where(cols[None, :] == i1[:, None], inf, score), axis=1, return_indices=True
                )
                k2 = k0 + i2.to(tl.int64)
                # top 2 of {best, second, t1, t2}: if t1 is the new best, the runner-up is
                # min(best, t2), else min(second, t1)
                old = tl.where(new_first, best, second)
                old_k = tl.where(new_first, best_k, second_k)
                cand = tl.where(new_first, t2, t1)
                cand_k = tl.where(new_first, k2, k1)
                take = cand < old
                second = tl.where(take, cand, old)
                second_k = tl.where(take, cand_k, old_k)
            best = tl.where(new_first, t1, best)
            best_k = tl.where(new_first, k1, best_k)
        if RERANK:
            # exact fp32 ||x - e||² of the two candidates, straight from the fp32 codebook
            er_base = er_ptr + group_codes * D
            d_first = tl.zeros((BLOCK_N,), tl.float32)
            d_second = tl.zeros((BLOCK_N,), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_ok = (d0 + dd) < D
                m = row_ok[:, None] & d_ok[None, :]
                cd = (d0 + dd)[None, :]
                xt = tl.load(xr_ptr + rows[:, None] * D + cd, mask=m, other=0.0).to(tl.float32)
                ea = tl.load(er_base + best_k[:, None] * D + cd, mask=m, other=0.0)
                eb = tl.load(er_base + second_k[:, None] * D + cd, mask=m, other=0.0)
                d_first += tl.sum((xt - ea) * (xt - ea), axis=1)
                d_second += tl.sum((xt - eb) * (xt - eb), axis=1)
            # one code in the split leaves second_k = best_k; exact ties go to the lower code
            swap = (d_second < d_first) | ((d_second == d_first) & (second_k < best_k))
            best = tl.where(swap, d_second, d_first)
            best_k = tl.where(swap, second_k, best_k)
        out = rows * num_splits + split
        tl.store(best_ptr + out, best, mask=row_ok)
        tl.store(code_ptr + out, best_k, mask=row_ok)


def _grouped_blocks(group_n: torch.Tensor, num_groups: int, block_n: int):
    """Sort tokens by codebook and cut each codebook's run into blocks of <= block_n tokens.

    Returns (order (N,), block_group, block_start, block_end), all on the device, the block
    arrays of length ceil(N / block_n) + G (an upper bound on the blocks needed, so no host
    sync); a block past the last one has start == end.
    """
    n, dev = group_n.shape[0], group_n.device
    order = torch.argsort(group_n, stable=True)
    counts = bincount(group_n, num_groups)  # tokens per codebook (fixed size: no sync)
    run_end = torch.cumsum(counts, 0)  # sorted position where codebook g's run ends
    run_start = run_end - counts
    blocks = (counts + block_n - 1) // block_n
    block_end_cum = torch.cumsum(blocks, 0)
    num_blocks = -(-n // block_n) + num_groups
    b = torch.arange(num_blocks, device=dev)
    group = torch.searchsorted(block_end_cum, b, right=True)  # G for blocks past the end
    valid = group < num_groups
    g = group.clamp_max(num_groups - 1)
    first_block = block_end_cum[g] - blocks[g]
    start = torch.where(valid, run_start[g] + (b - first_block) * block_n, n)
    end = torch.where(valid, run_end[g], n)
    return order, g, start, end


def auto_splits(device: torch.device, token_blocks: int, num_codes: int, block_k: int) -> int:
    """Codebook slices per block of tokens: 1 while the token blocks alone give every SM two
    programs (a codebook search of 65,536 tokens: 1,024 blocks), else enough slices to do so,
    at most one per tile of codes. Few tokens against many codes (CVQ's closest feature per
    code: 256 "tokens" against every feature) would otherwise run on a handful of SMs.
    Off CUDA (the interpreter) 1."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if token_blocks >= target:
        return 1
    return max(1, min(triton.cdiv(target, max(1, token_blocks)), triton.cdiv(num_codes, block_k)))


@torch.no_grad()
def nearest_code_fused(
    x_nd: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    group_n: torch.Tensor | None = None,
    input_precision: str = "tf32",
    rerank: bool | None = None,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `nearest_code`: codes (N,) int64 and distance (N,) fp32 (l2: squared; cosine:
    1 - cos), the same contract as `vqcore.ops.nearest_code`.

    codebook: (K, D), or (G, K, D) with `group_n` (N,) giving each token's codebook.
    input_precision: how fp32 operands enter `tl.dot` ("tf32" or "ieee"); bf16/fp16 inputs
    are used as they are. rerank: keep the two best codes of the rounded scores and choose
    between them by exact fp32 distance (None: on unless the operands are exact fp32).
    splits: programs per block of tokens, each searching a slice of the codebook, their
    minima reduced after the launch (None: enough to fill the GPU, see `auto_splits`).
    Needs `can_run(x_nd)`.
    """
    if not available():
        raise RuntimeError("nearest_code_fused: triton is not installed")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"nearest_code_fused: metric must be 'l2' or 'cosine', got {metric!r}")
    if input_precision not in PRECISIONS:
        raise ValueError(
            f"nearest_code_fused: input_precision must be one of {PRECISIONS}, "
            f"got {input_precision!r}"
        )
    if splits is not None and splits < 1:
        raise ValueError(f"nearest_code_fused: splits must be >= 1, got {splits}")
    if not can_run(x_nd):
        raise RuntimeError(
            "nearest_code_fused: x is on the CPU; the kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 to run it in Triton's interpreter)"
        )
    grouped = codebook.dim() == 3
    if grouped != (group_n is not None):
        raise ValueError(
            "nearest_code_fused: a (G, K, D) codebook needs group_n, a (K, D) one must not have it"
        )
    d = codebook.shape[-1]
    if x_nd.dim() != 2 or x_nd.shape[1] != d:
        raise ValueError(f"nearest_code_fused: x must be (N, {d}), got {tuple(x_nd.shape)}")
    dtype = operand_dtype(x_nd.dtype)
    if rerank is None:
        rerank = not (dtype == torch.float32 and input_precision == "ieee")
    books = codebook.float() if grouped else codebook.float()[None]  # (G, K, D)
    x = x_nd
    if metric == "cosine":
        books = torch.nn.functional.normalize(books, dim=-1)
        x = torch.nn.functional.normalize(x.float(), dim=-1)
    x, books = x.contiguous(), books.contiguous()
    tf32 = dtype == torch.float32 and input_precision == "tf32"
    x_op, x_sq = operands(x, dtype, tf32)
    # ||e||² of the operand codebook, in fp32: the scores are then exact distances between the
    # rounded operands (up to fp32 accumulation), the same search the reference runs
    e_op, esq = operands(books, dtype, tf32)  # (G, K, D), (G, K)
    blocks = list(_grouped_blocks(group_n.long(), books.shape[0], block_n)) if grouped else []
    precision = input_precision if dtype == torch.float32 else "tf32"  # fp32 operands only
    tiling = [block_n, block_k, splits or 0]  # 0: `auto_splits`, decided inside the op
    codes, best = _launch(x_op, e_op, esq, x, books, blocks, rerank, precision, tiling)
    dists = best if rerank else best + x_sq
    if metric == "cosine":
        dists = dists / 2  # ||a - b||² = 2 - 2cos for unit vectors
    return codes, dists


# The launch is a custom op: torch.compile keeps it as one node of its graph (Dynamo cannot
# trace a kernel in Triton's interpreter, and the graph needs no view inside the kernel), and
# FakeTensorMode takes its output shapes from `_launch_fake`. The token sort before it is torch.
@torch.library.custom_op("vqcore::nearest_code_launch", mutates_args=())
def _launch(
    x_op: torch.Tensor,
    e_op: torch.Tensor,
    esq: torch.Tensor,
    x: torch.Tensor,
    books: torch.Tensor,
    blocks: list[torch.Tensor],
    rerank: bool,
    precision: str,
    tiling: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel over prepared operands (see `nearest_code_fused`): codes (N,) int64 and the
    best score (N,) fp32 (||x - e||² with `rerank`, else ||e||² - 2 x·e). `blocks`: the
    grouped search's [order, block_group, block_start, block_end] of `_grouped_blocks`, or
    [] for one codebook. `tiling`: [block_n, block_k, splits (0: `auto_splits`)]; the
    split is decided here, at run time, where torch.compile does not trace the device query."""
    block_n, block_k, splits = tiling
    n, d = x_op.shape
    k = e_op.shape[1]
    if not splits:
        token_blocks = blocks[1].shape[0] if blocks else triton.cdiv(n, block_n)
        splits = auto_splits(x_op.device, token_blocks, k, block_k)
    k_per_split = max(1, triton.cdiv(triton.cdiv(k, splits), block_k)) * block_k  # whole tiles
    splits = max(1, triton.cdiv(k, k_per_split))  # no empty split
    best = torch.empty(n * splits, dtype=torch.float32, device=x_op.device)
    codes = torch.empty(n * splits, dtype=torch.long, device=x_op.device)
    if n == 0:
        return codes, best
    if blocks:
        order, block_group, block_start, block_end = blocks
        grid = (block_group.shape[0], splits)
    else:
        order = block_group = block_start = block_end = codes  # unused pointers
        grid = (triton.cdiv(n, block_n), splits)
    kernel, interpreted = jit(_nearest_kernel)
    kernel[grid](
        x_op,
        e_op,
        esq,
        x,
        books,
        order,
        block_group,
        block_start,
        block_end,
        best,
        codes,
        n,
        k,
        d,
        k_per_split,
        GROUPED=bool(blocks),
        RERANK=rerank,
        WIDEN=interpreted and x_op.dtype == torch.bfloat16,
        PRECISION=precision,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_D=block_d(d),
    )
    if splits > 1:  # the best of the splits; min takes the first (lowest codes) on ties
        best, pick = best.view(n, splits).min(1)
        codes = codes.view(n, splits).gather(1, pick[:, None]).squeeze(1)
    return codes, best


@_launch.register_fake
def _launch_fake(x_op, e_op, esq, x, books, blocks, rerank, precision, tiling):
    n = x_op.shape[0]
    return x_op.new_empty(n, dtype=torch.long), x_op.new_empty(n, dtype=torch.float32)


@register_flop_formula(torch.ops.vqcore.nearest_code_launch)
def _launch_flops(x_shape, e_shape, *args, out_shape=None, **kwargs) -> int:
    """2·N·K·D for torch's FlopCounterMode: each token against the K codes of its codebook."""
    n, d = x_shape
    return 2 * n * e_shape[1] * d
