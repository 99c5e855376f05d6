"""gvq, lfq, fsq: their maths against hand computation on tiny examples."""

import itertools
import math

import pytest
import torch

from vqcore.quantizers import build
from vqcore.quantizers.lfq import lfq_entropies

# --- gvq ------------------------------------------------------------------------------------


def test_gvq_temperature_follows_its_schedule():
    q = build(
        {
            "type": "gvq",
            "dim": 4,
            "codebook_size": 8,
            "temperature": 2.0,
            "min_temperature": 0.5,
            "anneal_rate": 0.3,
        }
    ).train()
    z = torch.randn(2, 4, 3, 3)
    for t in range(8):
        expected = max(0.5, 2.0 * math.exp(-0.3 * t))  # τ(t) = max(τ_min, τ₀ e^{-rt})
        assert q.temperature == pytest.approx(expected)
        assert float(q(z).metrics["temperature"]) == pytest.approx(expected)
    assert int(q.step) == 8 and q.temperature == 0.5  # floor reached at t = ln(4)/0.3 ≈ 4.6
    q.encode(z)
    q.eval()(z)
    assert int(q.step) == 8  # neither encode nor eval advances the schedule


def test_gvq_eval_is_argmax_and_kl_matches_hand_computation():
    torch.manual_seed(0)
    q = build({"type": "gvq", "dim": 4, "codebook_size": 8, "kl_weight": 0.5}).eval()
    z = torch.randn(2, 4, 3, 3)
    out = q(z)
    x = z.movedim(1, -1).reshape(-1, 4)
    logits = x @ q.proj.weight.t() + q.proj.bias
    assert torch.equal(out.codes.reshape(-1), logits.argmax(-1))
    probs = logits.softmax(-1)
    kl = (probs * torch.log(probs * 8)).sum(-1).mean()  # KL(q ‖ uniform(8))
    torch.testing.assert_close(out.loss, 0.5 * kl)
    torch.nn.init.zeros_(q.proj.weight)
    torch.nn.init.zeros_(q.proj.bias)
    assert q(z).loss.item() == pytest.approx(0.0, abs=1e-7)  # uniform logits: KL = 0


@pytest.mark.parametrize("hard", [True, False])
def test_gvq_training_sample_hard_or_soft(hard):
    torch.manual_seed(0)
    q = build({"type": "gvq", "dim": 4, "codebook_size": 8, "straight_through": hard}).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    e = q.decode(out.codes)  # codebook rows of the sampled codes
    if hard:  # one-hot forward: z_q is exactly a codebook row
        torch.testing.assert_close(out.z_q, e, atol=1e-6, rtol=0)
    else:  # relaxed sample: a convex mix, not a row
        assert not torch.allclose(out.z_q, e, atol=1e-6)
    out.z_q.square().sum().backward()
    assert q.proj.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


# --- lfq ------------------------------------------------------------------------------------


def test_lfq_codes_are_the_binary_numbers_of_the_signs():
    q = build({"type": "lfq", "dim": 3})
    z = torch.tensor([[0.5, -1.0, 2.0], [-0.1, -0.2, -0.3], [1.0, 1.0, 1.0], [-3.0, 4.0, 0.0]])
    z = z.t().reshape(1, 3, 4, 1)  # four positions, channels = bits 0, 1, 2
    out = q(z)
    assert out.codes.reshape(-1).tolist() == [1 + 4, 0, 1 + 2 + 4, 2]  # Σ 2^i 1{z_i > 0}
    torch.testing.assert_close(out.z_q, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(q.decode(out.codes), torch.where(z > 0, 1.0, -1.0))
    assert q.bits_per_token == 3


def _brute_force_entropies(x_nd, tau):
    """Materialise q(c|x) ∝ exp(-‖x - c‖²/τ) over all 2^d codes."""
    d = x_nd.shape[1]
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=x_nd.dtype)
    probs = (-torch.cdist(x_nd, codes).square() / tau).softmax(-1)  # (N, 2^d)
    per_sample = -(probs * probs.log()).sum(-1).mean()
    avg = probs.mean(0)
    return per_sample, -(avg * avg.log()).sum()


@pytest.mark.parametrize("d, tau", [(1, 1.0), (4, 1.0), (5, 0.3), (6, 2.0)])
def test_lfq_entropy_factorisation_equals_brute_force(d, tau):
    torch.manual_seed(d)
    x = torch.randn(7, d, dtype=torch.float64, requires_grad=True)
    got = lfq_entropies(x, tau)
    want = _brute_force_entropies(x, tau)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # and the same gradients
    g_got = torch.autograd.grad(got[0] - got[1], x)[0]
    g_want = torch.autograd.grad(want[0] - want[1], x)[0]
    torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=1e-8)


def test_lfq_grouped_batch_entropy_is_an_upper_bound_exact_for_independent_groups():
    torch.manual_seed(0)
    x = torch.randn(16, 6, dtype=torch.float64)
    exact = lfq_entropies(x, 1.0)[1]
    grouped = lfq_entropies(x, 1.0, group_bits=2)[1]  # 3 groups of 2 bits
    assert grouped >= exact - 1e-12 and grouped > exact  # subadditivity, strict here
    one = x[:1]  # a single token: Q is a product over bits, so groups are independent
    torch.testing.assert_close(lfq_entropies(one, 1.0, 2)[1], lfq_entropies(one, 1.0)[1])


def test_lfq_entropy_memory_d16_n4096():
    """d = 16, N = 4096: what autograd keeps for backward stays far below a GiB
    (N × 2^d fp32 would be 1 GiB)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(4096, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        per_sample, batch = lfq_entropies(x, 0.01)
    (per_sample - batch).backward()
    assert sum(saved) < 64 * 2**20, sum(saved)
    assert 0 < batch.item() <= 16 * math.log(2) + 1e-4 and torch.isfinite(x.grad).all()


def test_lfq_loss_is_commitment_plus_weighted_entropies():
    torch.manual_seed(0)
    spec = {"type": "lfq", "dim": 4, "beta": 0.7, "entropy_weight": 0.2, "diversity_gamma": 1.5}
    q = build(spec)
    z = torch.randn(2, 4, 3, 3)
    out = q(z)
    x = z.movedim(1, -1).reshape(-1, 4)
    commit = (x - torch.where(x > 0, 1.0, -1.0)).square().mean()
    h_sample, h_batch = lfq_entropies(x, 0.01)
    torch.testing.assert_close(out.loss, 0.7 * commit + 0.2 * (h_sample - 1.5 * h_batch))


def test_lfq_projections_when_codebook_dim_differs():
    torch.manual_seed(0)
    q = build({"type": "lfq", "dim": 8, "codebook_dim": 4})
    z = torch.randn(2, 8, 3, 5, requires_grad=True)
    out = q(z)
    assert out.codes.max() < 16 and q.bits_per_token == 4 and q.usage.counts.shape == (1, 16)
    out.z_q.sum().backward()
    assert q.project_in.weight.grad.abs().sum() > 0 and q.project_out.weight.grad.abs().sum() > 0
    q.eval()
    torch.testing.assert_close(q.decode(q.encode(z)), q(z).z_q, atol=1e-6, rtol=0)


def test_lfq_default_bits_are_capped_with_projections():
    """Wide latents get d = 18 bits (Open-MAGVIT2's 2^18 codes) through 1×1 projections."""
    q = build({"type": "lfq", "dim": 64})
    assert q.codebook_dim == 18 and q.bits_per_token == 18
    assert q.project_in.weight.shape == (18, 64) and q.project_out.weight.shape == (64, 18)
    assert build({"type": "lfq", "dim": 16}).project_in is None  # d = dim: no projection


def test_lfq_large_d_skips_the_per_code_histogram():
    torch.manual_seed(0)
    q = build({"type": "lfq", "dim": 24, "codebook_dim": 24})
    z = torch.randn(2, 24, 3, 3)
    out = q(z)
    assert float(out.metrics["usage_per_bit_only"]) == 1
    assert q.usage.counts.shape == (24, 2) and q.usage.counts.sum() == 24 * 18
    assert float(out.metrics["usage"]) == pytest.approx(18 / 2**24)  # 18 distinct codes
    assert q.bits_per_token == 24
    torch.testing.assert_close(q.decode(out.codes), out.z_q, atol=1e-6, rtol=0)


# --- fsq ------------------------------------------------------------------------------------


def _inverse_bound(q, integers):
    """x with round(bound(x)) == integers: invert f(x) = tanh(x + s) · h - o at a target kept
    0.05 inside f's open range (-h - o, h - o); the extreme values are reached by rounding."""
    half_l = (q.levels - 1) * (1 - 1e-3) / 2
    offset = (q.levels % 2 == 0).float() * 0.5
    shift = torch.tan(offset / half_l)
    target = torch.minimum(torch.maximum(integers, -half_l - offset + 0.05), half_l - offset - 0.05)
    return torch.atanh((target + offset) / half_l) - shift


def test_fsq_codes_are_a_bijection_on_the_grid():
    levels = [3, 4, 2]
    q = build({"type": "fsq", "dim": 3, "levels": levels})
    k = math.prod(levels)
    codes = torch.arange(k).view(1, k, 1)
    grid = q.decode(codes)  # (1, 3, K, 1), values in [-1, 1]
    points = {tuple(p) for p in grid[0, :, :, 0].t().tolist()}
    half = [n // 2 for n in levels]
    want = {
        tuple((v - h) / h for v, h in zip(digits, half))
        for digits in itertools.product(*[range(n) for n in levels])
    }
    assert points == want and len(points) == k  # every grid point exactly once
    ints = grid * torch.tensor(half, dtype=torch.float).view(1, 3, 1, 1)
    x = _inverse_bound(q, ints.movedim(1, -1)).movedim(-1, 1)
    assert torch.equal(q.encode(x), codes)  # encode ∘ decode = id
    # mixed radix by hand: channel 0 least significant
    digits = torch.tensor([[2, 3, 1]])  # index = 2 + 3·3 + 1·3·4
    x = _inverse_bound(q, (digits - torch.tensor(half)).float()).t().reshape(1, 3, 1, 1)
    assert q.encode(x).item() == 2 + 3 * 3 + 1 * 12


def test_fsq_bound_gives_exactly_l_values_per_channel():
    q = build({"type": "fsq", "dim": 4, "levels": [8, 5, 2, 7]})
    x = torch.linspace(-20, 20, 2001).view(1, 1, -1, 1).expand(1, 4, -1, 1)
    rounded = torch.round(q.bound(x.movedim(1, -1))).reshape(-1, 4)
    for i, n in enumerate([8, 5, 2, 7]):
        values = rounded[:, i].unique().tolist()
        assert values == list(range(-(n // 2), n - n // 2)), (n, values)
    assert torch.round(q.bound(torch.zeros(4))).abs().sum() == 0  # f(0) rounds to 0


def test_fsq_no_loss_projections_and_round_trip():
    torch.manual_seed(0)
    q = build({"type": "fsq", "dim": 8})  # default levels [8, 5, 5, 5]: projections 8 <-> 4
    z = torch.randn(2, 8, 3, 4, 5, requires_grad=True)
    out = q(z)
    assert out.loss.item() == 0 and q.usage.num_codes == 1000
    assert q.bits_per_token == pytest.approx(math.log2(1000))
    out.z_q.square().sum().backward()
    assert q.project_in.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    q.eval()
    torch.testing.assert_close(q.decode(q.encode(z)), q(z).z_q, atol=1e-6, rtol=0)


def test_scalar_config_errors_name_the_key():
    for spec, fragment in [
        ({"type": "fsq", "dim": 4, "levels": [8, 1]}, "levels"),
        ({"type": "lfq", "dim": 64, "codebook_dim": 64}, "codebook_dim"),
        ({"type": "gvq", "dim": 4, "min_temperature": 2.0}, "min_temperature"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            build(spec)
