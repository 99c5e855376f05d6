"""The fused nearest-code kernel (vqcore.ops.triton_nearest) against exact search.

With CUDA these tests run the compiled kernel. Without, `test_kernel_in_interpreter` runs
this file again in a subprocess with TRITON_INTERPRET=1, where the kernel runs in Triton's
interpreter on CPU tensors (the variable must be set before triton is imported: tl.min and
friends are themselves @triton.jit functions, built for one mode at import). The interpreter executes the kernel's own tiling, masking, running top-2 and re-rank
with numpy; what it cannot show is GPU speed and the tensor cores' own rounding, which the
wrapper makes irrelevant by rounding the operands to bf16/tf32 in torch first (the products
of such operands are exact in fp32).

Agreement is measured against exact float64 search of the kernel's input (for bf16 input:
the bf16 values upcast, with the fp32 codebook). A token may get another code only on a
near-tie: with operands rounded to unit roundoff u (bf16 2^-8, tf32 2^-11 rounded to nearest,
fp32 none) the kernel's score for code k is the distance between the rounded points, off the
true ||x - e_k||² by at most

    B_k = 2u·||x - e_k||·(||x|| + ||e_k||) + u²(||x|| + ||e_k||)² + γ(2 Σ_i|x_i e_ki| + ||e_k||² + ||x - e_k||²)

(γ = (D + 3)·2^-24·(1 + u)² covers fp32 accumulation of the dot, of ||e||², and of the exact
re-rank). Picking j over the exact best k* needs score_j <= score_k*, so its true distance gap
d_j - d_k* is at most B_j + B_k*: every disagreement must satisfy that.
"""

import copy
import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from vqcore.ops import nearest_code  # noqa: E402
from vqcore.ops import triton_nearest as tn  # noqa: E402
from vqcore.ops.nearest import use_fused  # noqa: E402
from vqcore.ops.triton_operands import operands, round_to_tf32  # noqa: E402
from vqcore.ops.triton_runtime import interpreting  # noqa: E402
from vqcore.quantizers.codebook import _grouped_nearest  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERPRETED = interpreting()  # this process is the interpreter subprocess
UNIT_ROUNDOFF = {"fp32": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}

kernel = pytest.mark.skipif(
    not (CUDA or INTERPRETED), reason="runs in test_kernel_in_interpreter's subprocess"
)
outer = pytest.mark.skipif(INTERPRETED, reason="ran in the parent process")


@pytest.fixture(autouse=True)
def auto_dispatch(monkeypatch):
    monkeypatch.delenv("VQCORE_FUSED", raising=False)


@pytest.mark.slow  # ~25 s of CPU (the interpreter runs the kernel op by op with numpy)
@pytest.mark.skipif(CUDA or INTERPRETED, reason="CUDA runs the kernel tests directly")
def test_kernel_in_interpreter():
    """The @kernel tests below, run by Triton's interpreter on CPU in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("VQCORE_FUSED", None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-s", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    print(out.stdout[-6000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def _search(x, e, precision, rerank=None, **kw):
    """The kernel on `precision` operands: returns its input x (as searched) and codes, dists."""
    x_in = x.bfloat16() if precision == "bf16" else x
    ip = "ieee" if precision == "fp32" else "tf32"
    codes, dists = tn.nearest_code_fused(
        x_in.to(DEVICE), e.to(DEVICE), input_precision=ip, rerank=rerank, **kw
    )
    return x_in.double(), codes.cpu(), dists.cpu()


def _exact(x64, e64):
    """Squared distances (N, K) in float64 from the differences (no ||x||² - 2x·e + ||e||²)."""
    e64 = e64.double()
    if x64.dim() == 3:  # (N, 1, D) against per-token codebooks (N, K, D)
        return (x64 - e64).square().sum(-1)
    return torch.cat([(c[:, None] - e64[None]).square().sum(-1) for c in x64.split(64)])


def _near_tie_bound(x64, e64, u):
    """B_k of the module docstring, (N, K)."""
    e64 = e64.double()
    d = _exact(x64, e64)
    nx, ne = x64.norm(dim=1)[:, None], e64.norm(dim=1)[None]
    gamma = (x64.shape[1] + 3) * 2.0**-24 * (1 + u) ** 2
    dots = x64.abs() @ e64.abs().t()
    return 2 * u * d.sqrt() * (nx + ne) + u**2 * (nx + ne) ** 2 + gamma * (2 * dots + ne**2 + d)


def _check_near_ties(x64, e, codes, u):
    """Every code that is not the exact best is within the rounding band of it."""
    d = _exact(x64, e)
    best = d.argmin(1)
    bad = (codes != best).nonzero().flatten()
    if bad.numel():
        bound = _near_tie_bound(x64[bad], e, u)
        rows = torch.arange(bad.numel())
        gap = d[bad, codes[bad]] - d[bad, best[bad]]
        allowed = bound[rows, codes[bad]] + bound[rows, best[bad]]
        assert (gap <= allowed).all(), f"gaps {gap[gap > allowed]} over {allowed[gap > allowed]}"
    return 1 - bad.numel() / codes.numel()


@functools.lru_cache(maxsize=1)
def _astronaut_latents(n: int, k: int):
    """'Real' latents: distinct 4x4 RGB patches of skimage's astronaut (D = 48), centred, and
    a codebook of K k-means centroids fit on other patches (codes where the data is dense,
    so near-ties are realistic). Duplicate patches are dropped: 1,424 copies of one flat patch
    would all share whichever tie that patch has."""
    data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(data.astronaut()).float() / 127.5 - 1
    p = torch.unique(img.unfold(0, 4, 4).unfold(1, 4, 4).reshape(-1, 48), dim=0)
    p = p - p.mean(0)
    perm = torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(0))
    train, test = p[perm[:4096]], p[perm[4096 : 4096 + n]]
    e = train[:k].clone()
    for _ in range(8):  # Lloyd iterations
        a = torch.cdist(train, e).argmin(1)
        sums = torch.zeros_like(e).index_add_(0, a, train)
        count = torch.bincount(a, minlength=k)[:, None]
        e = torch.where(count > 0, sums / count.clamp_min(1), e)
    return test, e


def _latents(kind: str, n: int = 512, k: int = 300):
    g = torch.Generator().manual_seed(0)
    if kind == "astronaut48":
        return _astronaut_latents(n, k)
    d = int(kind.removeprefix("random"))
    return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)


@kernel
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("d,splits", [(8, 1), (80, 1), (8, 3)])
def test_integer_grid_exact_ties_go_to_lowest_code(precision, d, splits):
    """Small integers are exact in bf16/tf32 and all sums exact in fp32: the kernel must equal
    torch's argmin (first index among exact ties, which are common here) and its distances.
    N = 509 and K = 300 are not multiples of the blocks; D = 80 takes two D slices; with 3
    splits the codebook is cut into slices of 128, 128 and 44 codes, and ties across slices
    must still go to the lowest code."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-2, 3, (509, d), generator=g).float()
    e = torch.randint(-2, 3, (300, d), generator=g).float()
    _, codes, dists = _search(x, e, precision, splits=splits)
    full = _exact(x.double(), e)
    ties = (full == full.min(1, keepdim=True).values).sum(1) > 1
    assert ties.sum() > 10  # the test does exercise ties
    assert torch.equal(codes, full.argmin(1))
    assert torch.equal(dists.double(), full.min(1).values)


@kernel
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("kind", ["random32", "random8", "astronaut48"])
def test_agreement_with_exact_search(kind, precision):
    """>= 99.9 % of tokens get the exact float64 code; the others are near-ties (bound above).
    Without the re-rank the rounded scores alone still pick exactly what exact search of the
    rounded operands picks, and disagree with the input's exact search only within the band."""
    x, e = _latents(kind)
    u = UNIT_ROUNDOFF[precision]
    x64, codes, dists = _search(x, e, precision)
    rate = _check_near_ties(x64, e, codes, u)
    print(f"{kind} {precision} N={len(x)} K={len(e)}: {100 * rate:.3f} % agree (re-rank on)")
    assert rate >= 0.999
    torch.testing.assert_close(dists.double(), _exact(x64, e).min(1).values, rtol=1e-4, atol=1e-4)

    x64, plain, _ = _search(x, e, precision, rerank=False)
    rate_plain = _check_near_ties(x64, e, plain, u)
    print(f"{kind} {precision}: {100 * rate_plain:.3f} % agree (re-rank off)")
    if precision != "fp32":
        rounded_x = round_to_tf32(x64.float()) if precision == "tf32" else x64.float()
        rounded_e = round_to_tf32(e) if precision == "tf32" else e.bfloat16().float()
        same_operands = _check_near_ties(rounded_x.double(), rounded_e, plain, 0.0)
        assert same_operands >= 0.999


@kernel
@pytest.mark.parametrize(
    "dtype,tf32",
    [
        (torch.float32, True),
        (torch.float32, False),
        (torch.bfloat16, False),
        (torch.float16, False),
    ],
)
def test_operands_round_like_torch(dtype, tf32):
    """The operand kernel rounds as `round_to_tf32` / torch's casts (to nearest, ties to even,
    inf and nan kept) and sums the squares of what it rounded; from fp32 and from bf16 input.
    Normal-range values: subnormals are flushed by the interpreter, not by the GPU."""
    g = torch.Generator().manual_seed(6)
    scale = torch.logspace(-3, 3, 24) if dtype == torch.float16 else torch.logspace(-20, 20, 24)
    t = torch.randn(300, 24, generator=g) * scale
    t[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -1.0])
    t[1, :4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11])  # ties
    for src in (t, t.bfloat16()):
        op, sq = operands(src.to(DEVICE), dtype, tf32)
        want = round_to_tf32(src) if tf32 else src.to(dtype)
        assert op.dtype == dtype
        torch.testing.assert_close(op.cpu(), want, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(sq.cpu()[2:], want[2:].float().pow(2).sum(-1), rtol=1e-6, atol=0)


@kernel
def test_grouped_search_matches_per_token_search():
    """G = 6 codebooks, one empty, one with several blocks of tokens, one with a single
    token: every token searched in its own codebook only, one launch."""
    g = torch.Generator().manual_seed(2)
    n, k, d = 400, 70, 16
    books = torch.randn(6, k, d, generator=g)
    group = torch.randint(0, 6, (n,), generator=g)
    group[group == 2] = 0  # codebook 2 has no token
    group[group == 5] = 4
    group[0] = 5  # codebook 5 has exactly one
    group[1:201] = 0  # codebook 0 spans several BLOCK_N blocks
    x = torch.randn(n, d, generator=g)
    expected = _exact(x.double()[:, None], books[group]).argmin(1)
    _, codes, _ = _search(x, books, "fp32", group_n=group.to(DEVICE))
    assert torch.equal(codes, expected)
    _, codes, _ = _search(x, books, "tf32", group_n=group.to(DEVICE), block_n=32, block_k=32)
    assert (codes == expected).float().mean() >= 0.99
    _, codes, _ = _search(x, books, "fp32", group_n=group.to(DEVICE), block_k=16, splits=4)
    assert torch.equal(codes, expected)  # 70 codes in slices of 16, 16, 16, 16, 6


@kernel
@pytest.mark.parametrize("kind", ["integers", "random8"])
def test_nearest_feature_per_code_fused(kind, monkeypatch):
    """CVQ's closest feature of each code: the kernel with codes and features swapped, cut
    over the features, picks what the chunked torch path picks (exact ties: lowest row)."""
    from vqcore.ops import nearest_feature_per_code

    g = torch.Generator().manual_seed(5)
    if kind == "integers":
        x, e = (
            torch.randint(-2, 3, (700, 8), generator=g),
            torch.randint(-2, 3, (40, 8), generator=g),
        )
        x, e = x.float(), e.float()
    else:
        x, e = torch.randn(700, 8, generator=g), torch.randn(40, 8, generator=g)
    want = nearest_feature_per_code(x, e, fused=False)
    got = nearest_feature_per_code(x.to(DEVICE), e.to(DEVICE), fused=True).cpu()
    assert torch.equal(got, want)
    rows = tn.nearest_code_fused(e.to(DEVICE), x.to(DEVICE), splits=5)[0].cpu()
    assert torch.equal(x[rows], want)  # 700 features in 4 slices: 3 of 192, one of 124


@kernel
def test_codebook_grouped_path_uses_one_fused_call(monkeypatch):
    """`_grouped_nearest` (pq, hrvq) takes the kernel when VQCORE_FUSED=1 and the torch path
    when 0; both pick the same codes here."""
    g = torch.Generator().manual_seed(3)
    books, x = torch.randn(9, 40, 8, generator=g), torch.randn(300, 8, generator=g)
    group = torch.randint(0, 9, (300,), generator=g)
    calls = []
    real = tn.nearest_code_fused
    monkeypatch.setattr(
        "vqcore.quantizers.codebook.nearest_code_fused",
        lambda *a, **kw: calls.append(1) or real(*a, **kw),
    )
    monkeypatch.setenv("VQCORE_FUSED", "1")
    fused = _grouped_nearest(x.to(DEVICE), books.to(DEVICE), group.to(DEVICE), "l2").cpu()
    monkeypatch.setenv("VQCORE_FUSED", "0")
    plain = _grouped_nearest(x, books, group, "l2")
    assert calls == [1]
    assert (fused == plain).float().mean() >= 0.99


@kernel
def test_cosine_and_empty_input():
    g = torch.Generator().manual_seed(4)
    x, e = torch.randn(200, 12, generator=g).to(DEVICE), torch.randn(50, 12, generator=g)
    codes, dists = nearest_code(x, e.to(DEVICE), "cosine", fused=True)
    ref_codes, ref_dists = nearest_code(x.cpu(), e, "cosine", fused=False)
    assert (codes.cpu() == ref_codes).float().mean() >= 0.99
    same = codes.cpu() == ref_codes
    torch.testing.assert_close(dists.cpu()[same], ref_dists[same], atol=1e-5, rtol=1e-5)
    codes, dists = tn.nearest_code_fused(x[:0], e.to(DEVICE))
    assert codes.shape == dists.shape == (0,)


GROUPED_FAMILIES = ["pq", "hrvq"]
# looc: CVQ's closest-feature search (on by default) runs the kernel with codes and features
# swapped
FUSED_FAMILIES = GROUPED_FAMILIES + ["vq", "looc"]


@kernel
@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_training_step_reads_nothing_back(family, monkeypatch):
    """Through the fused search, a training forward + backward of the grouped families
    (whose torch fallback splits tokens on the host) has no data-dependent op: the token sort
    runs on fake tensors, which raise on any read back to the host."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vqcore.quantizers import build

    monkeypatch.setenv("VQCORE_FUSED", "1")
    monkeypatch.setenv("VQCORE_CHECK_FINITE", "0")
    q = build({"type": family, "dim": 8}).train().to(DEVICE)
    with FakeTensorMode(allow_non_fake_inputs=True):
        z = torch.randn(2, 8, 3, 4, 5, device=DEVICE, requires_grad=True)
        out = q(z)
        (out.z_q.square().mean() + out.loss).backward()
        assert z.grad.shape == z.shape


@kernel
@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_search_compiles_into_one_graph(family, monkeypatch):
    """torch.compile(fullgraph=True) of a training forward with the fused search: the launch
    is one custom op, the sort before it is traced; the same codes as eager."""
    from vqcore.quantizers import build

    monkeypatch.setenv("VQCORE_FUSED", "1")
    monkeypatch.setenv("VQCORE_CHECK_FINITE", "0")
    torch._dynamo.reset()
    torch.manual_seed(0)
    q = build({"type": family, "dim": 8}).train().to(DEVICE)
    twin = copy.deepcopy(q)  # the forward may move EMA/usage buffers: compare from one state
    z = torch.randn(2, 8, 3, 4, 5, device=DEVICE)
    want = q(z).codes
    got = torch.compile(twin, backend="eager", fullgraph=True)(z).codes
    for a, b in zip(*(c if isinstance(c, tuple) else (c,) for c in (want, got)), strict=True):
        assert torch.equal(a, b)


@outer
def test_switch(monkeypatch):
    """Auto: fused only for CUDA tensors; 0 forces torch; 1 forces the kernel and fails
    clearly where it cannot run; other values are an error."""
    cpu = torch.zeros(4, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # plain CPU, as in CI
    assert use_fused(cpu) is False
    monkeypatch.setenv("VQCORE_FUSED", "0")
    assert use_fused(cpu) is False
    monkeypatch.setenv("VQCORE_FUSED", "1")
    with pytest.raises(RuntimeError, match="not on CUDA"):
        use_fused(cpu)
    with pytest.raises(RuntimeError, match="not on CUDA"):
        nearest_code(cpu, torch.zeros(2, 3))
    monkeypatch.setenv("VQCORE_FUSED", "maybe")
    with pytest.raises(ValueError, match="VQCORE_FUSED"):
        use_fused(cpu)
    assert use_fused(cpu, fused=False) is False  # the argument wins over the variable
    with pytest.raises(ValueError, match="splits must be >= 1"):
        tn.nearest_code_fused(cpu, torch.zeros(2, 3), splits=0)


@outer
def test_vqcore_runs_without_triton():
    """With triton unimportable, vqcore imports, searches and quantizes on torch alone."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        from vqcore.ops import nearest_code, triton_runtime
        from vqcore.quantizers import build
        assert not triton_runtime.available()
        codes, _ = nearest_code(torch.randn(10, 4), torch.randn(5, 4))
        q = build({"type": "hrvq", "dim": 4, "codebook_size": 4, "num_layers": 2})
        q(torch.randn(1, 4, 2, 2))
        try:
            nearest_code(torch.randn(10, 4), torch.randn(5, 4), fused=True)
        except RuntimeError as exc:
            print("refused:", exc)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VQCORE_FUSED", "TRITON_INTERPRET")}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "triton is not installed" in out.stdout
