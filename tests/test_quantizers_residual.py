"""rvq, rvq_lfq, pyramid: residual maths, quantize-dropout, scale shapes, gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vqcore.quantizers import build


def _record_inputs(q):
    """Make every level record the tensor it quantizes (levels are called via `.quantize`)."""
    seen = []
    for level in q.levels:
        inner = level.quantize

        def spy(x, inner=inner):
            seen.append(x.detach().clone())
            return inner(x)

        level.quantize = spy
    return seen


def _contributions(q, codes):
    """Level i's decoded contribution s_i · Q_i.decode(codes_i), upsampled (for pyramids)."""
    parts = list(codes.unbind(1)) if isinstance(codes, torch.Tensor) else list(codes)
    size = parts[-1].shape[1:]
    return [
        q._fuse(i, q._up(i, q.levels[i].decode(c) * q.level_scales[i], size))
        for i, c in enumerate(parts)
    ]


# --- rvq / rvq_lfq --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "rvq", "dim": 4, "num_quantizers": 3, "inner": {"codebook_size": 16}},
        {"type": "rvq_lfq", "dim": 4, "num_quantizers": 3},
    ],
)
def test_rvq_level_i_sees_input_minus_earlier_levels(spec):
    torch.manual_seed(0)
    q = build(spec).eval()
    seen = _record_inputs(q)
    z = torch.randn(2, 4, 3, 5)
    out = q(z)
    assert out.codes.shape == (2, 3, 3, 5)
    parts = _contributions(q, out.codes)
    for i in range(3):
        residual = z - sum(parts[:i], torch.zeros_like(z))  # r_i = z - Σ_{j<i} q_j
        torch.testing.assert_close(seen[i], residual / q.level_scales[i])
    torch.testing.assert_close(out.z_q, sum(parts), atol=1e-6, rtol=0)


def test_pyramid_scales_no_level_by_default():
    """PVQ's levels differ in resolution, not magnitude: s_k = 1 for LFQ children too (VAR,
    Alg. 1), where rvq_lfq halves each level; an explicit scale_decay still applies."""
    assert build({"type": "pyramid", "dim": 4}).level_scales == [1, 1, 1]
    assert build({"type": "pyramid", "dim": 4, "scale_decay": 0.5}).level_scales == [1, 0.5, 0.25]
    assert build({"type": "rvq_lfq", "dim": 4, "num_quantizers": 3}).level_scales == [1, 0.5, 0.25]


def test_pyramid_fuses_each_level_by_default():
    """PVQ's levels pass a learned 1×1 projection, identity at the start (BENCHMARKS.md "What
    else PVQ's levels need"): a fresh pyramid equals the one without them."""
    torch.manual_seed(0)
    q = build({"type": "pyramid", "dim": 4})
    plain = build({"type": "pyramid", "dim": 4, "projections": False})
    assert q.fuse is not None and len(q.fuse) == 3 and plain.fuse is None
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(q.eval()(z).z_q, plain.eval()(z).z_q)


def test_rvq_lfq_refines_like_a_binary_expansion():
    """Levels at scales 1, 1/2, 1/4, 1/8: each halves the residual's range, so for |z| < 2 the
    error after 4 levels is below 1/8 (hand computation)."""
    q = build({"type": "rvq_lfq", "dim": 4, "num_quantizers": 4}).eval()
    assert q.level_scales == [1, 0.5, 0.25, 0.125]
    z = torch.rand(2, 4, 5, 5) * 3.9 - 1.95
    errors = [(z - q.decode(q.encode(z)[:, :n])).abs().max().item() for n in range(1, 5)]
    assert errors[-1] <= 0.125 + 1e-6
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_rvq_loss_is_the_sum_of_level_losses_in_z_units():
    """Σ_i s_i² · loss_i; without entropy terms that is RQ-VAE's β Σ_i ‖r_{i+1}‖² (mean over
    elements), the commitment of each level measured on z's scale, not the magnified one."""
    torch.manual_seed(0)
    q = build({"type": "rvq_lfq", "dim": 4, "num_quantizers": 3})
    z = torch.randn(2, 4, 3, 3)
    out = q(z)
    parts = _contributions(q, out.codes)
    losses = []
    for i, level in enumerate(q.levels):  # lfq's loss is deterministic: recompute per level
        residual = z - sum(parts[:i], torch.zeros_like(z))
        losses.append(level.quantize(residual / q.level_scales[i]).loss * q.level_scales[i] ** 2)
    torch.testing.assert_close(out.loss, sum(losses))

    plain = build({"type": "rvq_lfq", "dim": 4, "num_quantizers": 3,
                   "inner": {"type": "lfq", "entropy_weight": 0.0, "beta": 0.25}})  # fmt: skip
    out = plain(z)
    parts = _contributions(plain, out.codes)
    rq_vae = sum(0.25 * (z - sum(parts[: i + 1])).square().mean() for i in range(3))
    torch.testing.assert_close(out.loss, rq_vae)

    # level_loss_weights w_i: Σ_i w_i s_i² loss_i, the same codes and z_q
    weighted = build({"type": "rvq_lfq", "dim": 4, "num_quantizers": 3,
                      "level_loss_weights": [0.0, 0.5, 1.0]})  # fmt: skip
    weighted.load_state_dict(q.state_dict())
    got = weighted(z)
    torch.testing.assert_close(got.loss, 0.5 * losses[1] + losses[2])
    torch.testing.assert_close(got.z_q, q(z).z_q)


def test_pyramid_of_lfq_keeps_the_finest_levels_loss_by_default():
    """PVQ (lfq levels): the finest level's loss alone, β‖z - sg[ẑ]‖² without entropy terms;
    PSVQ (vq levels) and an explicit `level_loss_weights` keep every level's."""
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    spec = {"type": "pyramid", "dim": 4, "projections": False,
            "inner": {"type": "lfq", "entropy_weight": 0.0, "beta": 0.25}}  # fmt: skip
    pvq = build(spec)
    out = pvq(z)
    torch.testing.assert_close(out.loss, 0.25 * (z - out.z_q).square().mean())
    every = build({**spec, "level_loss_weights": [1, 1, 1]})
    parts = _contributions(every, every(z).codes)
    partial = sum(every.levels[i].quantize(every._down(i, z - sum(parts[:i], 0 * z))).loss
                  for i in range(3))  # fmt: skip
    torch.testing.assert_close(every(z).loss, partial)
    assert build({"type": "pyramid", "dim": 4, "inner": {"type": "vq"}}).loss_weights == [1.0] * 3


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "rvq", "dim": 4, "inner": {"codebook_size": 8}},
        {"type": "rvq_lfq", "dim": 4},
        {"type": "pyramid", "dim": 4, "upsample": "linear"},
        {"type": "pyramid", "dim": 4, "upsample": "nearest", "downsample_time": True},
        {"type": "pyramid", "dim": 4, "inner": {"type": "vq", "codebook_size": 8}},
    ],
)
@pytest.mark.parametrize("shape", [(2, 4, 7, 5), (2, 4, 3, 6, 5)])
def test_composite_is_straight_through(spec, shape):
    """∂ẑ/∂z = I for straight-through children, however many levels / scales."""
    torch.manual_seed(0)
    q = build(spec)
    z = torch.randn(shape, requires_grad=True)
    q(z).z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z), atol=1e-6, rtol=0)


def test_quantize_dropout_uses_fewer_levels_and_prefixes_decode():
    spec = {
        "type": "rvq",
        "dim": 4,
        "num_quantizers": 4,
        "inner": {"codebook_size": 8},
        "quantize_dropout": 1.0,
        "quantize_dropout_min": 2,
    }
    torch.manual_seed(0)
    q = build(spec).train()
    z = torch.randn(2, 4, 3, 3)
    used = {q(z).codes.shape[1] for _ in range(30)}
    assert used == {2, 3, 4}  # n ~ U{2, .., 4}
    out = q(z)
    assert float(out.metrics["levels"]) == out.codes.shape[1]
    q.eval()
    assert q(z).codes.shape[1] == 4  # never in eval
    codes = q.encode(z)
    torch.testing.assert_close(
        q.decode(codes[:, :2]), sum(_contributions(q, codes)[:2]), atol=1e-6, rtol=0
    )


def test_quantize_dropout_probability_zero_keeps_all_levels():
    torch.manual_seed(0)
    q = build({"type": "rvq", "dim": 4, "inner": {"codebook_size": 8}}).train()
    assert all(q(torch.randn(2, 4, 3, 3)).codes.shape[1] == 4 for _ in range(5))


def test_shared_codebook_is_one_codebook():
    spec = {"type": "rvq", "dim": 4, "num_quantizers": 3, "shared_codebook": True}
    q = build({**spec, "inner": {"codebook_size": 8}})
    assert all(level.codebook is q.levels[0].codebook for level in q.levels)
    assert sum(p.numel() for p in q.parameters()) == 8 * 4
    z = torch.randn(2, 4, 3, 3)
    out = q(z)
    (out.z_q.sum() + out.loss).backward()
    assert q.levels[0].codebook.weight.grad.abs().sum() > 0
    assert q.usage.counts.shape == (3, 8) and q.usage.counts.sum() == 3 * 18
    with pytest.raises(ValueError, match="shared_codebook"):
        build({**spec, "inner": {"type": "lfq"}})


def test_rvq_usage_has_one_row_per_level_and_bits_add_up():
    q = build({"type": "rvq_lfq", "dim": 4, "num_quantizers": 3})
    q(torch.randn(2, 4, 3, 3))
    assert q.usage.counts.shape == (3, 16) and torch.equal(
        q.usage.counts.sum(1), torch.full((3,), 18.0)
    )
    assert q.bits_per_token == 12


# --- pyramid --------------------------------------------------------------------------------


@pytest.mark.parametrize("scales", [[4, 2, 1], [0.25, 0.5, 1.0]])
@pytest.mark.parametrize(
    "shape, time, want",
    [
        ((2, 4, 7, 5), False, [(2, 2, 2), (2, 4, 3), (2, 7, 5)]),
        ((2, 4, 8, 8), False, [(2, 2, 2), (2, 4, 4), (2, 8, 8)]),
        ((2, 4, 3, 5, 7), False, [(2, 3, 2, 2), (2, 3, 3, 4), (2, 3, 5, 7)]),
        ((2, 4, 3, 5, 7), True, [(2, 1, 2, 2), (2, 2, 3, 4), (2, 3, 5, 7)]),
    ],
)
def test_pyramid_codes_have_the_downsampled_shapes(scales, shape, time, want):
    torch.manual_seed(0)
    q = build({"type": "pyramid", "dim": 4, "scales": scales, "downsample_time": time}).eval()
    z = torch.randn(shape)
    out = q(z)
    assert isinstance(out.codes, tuple) and [tuple(c.shape) for c in out.codes] == want
    torch.testing.assert_close(q.decode(out.codes), out.z_q, atol=1e-6, rtol=0)


def test_pyramid_downsample_is_the_block_mean_over_existing_cells():
    torch.manual_seed(0)
    q = build({"type": "pyramid", "dim": 2, "scales": [2, 1], "upsample": "nearest"}).eval()
    seen = _record_inputs(q)
    z = torch.randn(1, 2, 3, 5)
    out = q(z)
    want = torch.empty(1, 2, 2, 3)
    for i in range(2):
        for j in range(3):
            want[..., i, j] = z[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((-2, -1))
    torch.testing.assert_close(seen[0], want)  # last row / column: partial blocks
    up = _contributions(q, out.codes)[0]  # nearest: every position gets its block's code
    block = q.levels[0].decode(out.codes[0])
    torch.testing.assert_close(
        up, block.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :3, :5]
    )
    torch.testing.assert_close(seen[1], (z - up) / q.level_scales[1])  # fine: (z - coarse) / s_1


def test_pyramid_bits_per_token():
    q = build({"type": "pyramid", "dim": 4})  # lfq d = 4 at factors 4, 2, 1
    assert q.bits_per_token == pytest.approx(4 / 16 + 4 / 4 + 4)
    assert float(q(torch.randn(2, 4, 8, 8)).metrics["bits_per_token"]) == pytest.approx(
        q.bits_per_token
    )
    odd = q(torch.randn(2, 4, 7, 5)).metrics["bits_per_token"]  # ceil: (2·2 + 4·3 + 35)·4 / 35
    assert float(odd) == pytest.approx((4 + 12 + 35) * 4 / 35)


def test_pyramid_projections_learn_and_round_trip():
    torch.manual_seed(0)
    q = build({"type": "pyramid", "dim": 4, "projections": True})
    z = torch.randn(2, 4, 6, 6, requires_grad=True)
    out = q(z)
    (out.z_q.square().sum() + out.loss).backward()
    for lin in q.fuse:
        assert lin.weight.grad.abs().sum() > 0
    q.eval()
    torch.testing.assert_close(q.decode(q.encode(z)), q(z).z_q, atol=1e-6, rtol=0)


def test_psvq_shared_codebook_over_scales():
    torch.manual_seed(0)
    spec = {"type": "pyramid", "dim": 4, "inner": {"type": "vq", "codebook_size": 16}}
    q = build({**spec, "shared_codebook": True, "projections": False})
    assert sum(p.numel() for p in q.parameters()) == 16 * 4  # one codebook, nothing else
    z = torch.randn(2, 4, 3, 6, 6)
    q.eval()
    torch.testing.assert_close(q.decode(q.encode(z)), q(z).z_q, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ({"type": "pyramid", "scales": [2, 4, 1]}, "coarse to fine"),
        ({"type": "pyramid", "scales": [4, 2]}, "full resolution"),
        ({"type": "pyramid", "scales": [0.3, 1]}, "fractions"),
        ({"type": "pyramid", "upsample": "cubic"}, "upsample"),
        ({"type": "rvq_lfq", "inner": {"type": "vq"}}, "inner type"),
        ({"type": "rvq", "inner": {"type": "vq", "dim": 3}}, "inner dim"),
        ({"type": "rvq", "inner": {"type": "vq", "codebook_sise": 3}}, "codebook_sise"),
        ({"type": "rvq", "quantize_dropout_min": 9}, "quantize_dropout_min"),
        ({"type": "pyramid", "level_loss_weights": [0, 1]}, "level_loss_weights"),
        ({"type": "rvq", "num_quantizers": 2, "level_loss_weights": [1, -1]}, "level_loss_weights"),
        ({"type": "rvq", "inner": {"type": "pq"}}, "one code per position"),
    ],
)
def test_composite_config_errors(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        build({"dim": 4, **spec})


def test_decode_rejects_malformed_codes():
    rvq = build({"type": "rvq", "dim": 4, "inner": {"codebook_size": 8}})
    with pytest.raises(ValueError, match="levels"):
        rvq.decode(torch.zeros(2, 5, 3, 3, dtype=torch.long))
    pyr = build({"type": "pyramid", "dim": 4})
    with pytest.raises(ValueError, match="tuple of 3"):
        pyr.decode((torch.zeros(2, 3, 3, dtype=torch.long),))


@settings(max_examples=25, deadline=None)
@given(
    t=st.one_of(st.none(), st.integers(1, 4)),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    factors=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    nearest=st.booleans(),
    time=st.booleans(),
)
def test_pyramid_property_any_size(t, h, w, factors, nearest, time):
    scales = sorted(factors, reverse=True) + [1]
    spec = {
        "type": "pyramid",
        "dim": 3,
        "scales": scales,
        "upsample": "nearest" if nearest else "linear",
        "downsample_time": time,
    }
    torch.manual_seed(0)
    q = build(spec).eval()
    spatial = (h, w) if t is None else (t, h, w)
    z = torch.randn(1, 3, *spatial)
    out = q(z)
    assert out.z_q.shape == z.shape
    for c, f in zip(out.codes, scales):
        kernel = [f] * len(spatial)
        if t is not None and not time:
            kernel[0] = 1  # T is pooled only with downsample_time
        assert tuple(c.shape[1:]) == tuple(math.ceil(n / k) for n, k in zip(spatial, kernel))
    torch.testing.assert_close(q.decode(out.codes), out.z_q, atol=1e-6, rtol=0)
