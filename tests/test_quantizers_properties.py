"""Property test (hypothesis): every registered family, random batch / channel / spatial
sizes (2D and 3D) and codebook sizes: shapes, integer codes in range, finite loss and metrics,
eval-mode decode(encode(z)) == forward(z).z_q."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqcore.quantizers import build, make_config, names

# Small per-family overrides drawn alongside the shape (only for fields the config has).
EXTRA = {
    "looc": {"alpha": st.sampled_from([1, 2]), "interpolate_time": st.booleans()},
    "hrvq": {"num_layers": st.integers(1, 3)},
}


@st.composite
def cases(draw, family: str):
    dim = draw(st.integers(1, 8))
    spatial = draw(
        st.one_of(
            st.tuples(st.integers(1, 5), st.integers(1, 5)),
            st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
        )
    )
    fields = {f.name for f in dataclasses.fields(make_config({"type": family, "dim": dim}))}
    spec = {"type": family, "dim": dim}
    if "codebook_size" in fields:
        spec["codebook_size"] = draw(st.integers(2, 16))
    for key, strategy in EXTRA.get(family, {}).items():
        if key in fields:
            spec[key] = draw(strategy)
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return spec, (batch, dim, *spatial), seed


def _flat(codes):
    return list(codes) if isinstance(codes, tuple) else [codes]


@pytest.mark.parametrize("family", names())
def test_random_shapes_round_trip(family):
    @settings(
        max_examples=15,
        deadline=None,
        derandomize=True,  # the same examples on every run: CI stays deterministic
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(cases(family))
    def check(case):
        spec, shape, seed = case
        torch.manual_seed(seed)
        q = build(spec)
        z = torch.randn(shape)
        train = q.train()(z)
        assert train.z_q.shape == z.shape, spec
        assert train.loss.dim() == 0 and torch.isfinite(train.loss), spec
        q.eval()
        out = q(z)
        assert out.z_q.shape == z.shape and torch.isfinite(out.z_q).all(), spec
        for key in ("usage", "perplexity", "bits_per_token"):
            assert torch.isfinite(torch.as_tensor(out.metrics[key])), (spec, key)
        assert 0 <= float(out.metrics["usage"]) <= 1, spec
        codes = q.encode(z)
        for c, ref in zip(_flat(codes), _flat(out.codes)):
            assert not c.is_floating_point() and int(c.min()) >= 0, spec
            if "codebook_size" in spec:
                assert int(c.max()) < spec["codebook_size"], spec
            assert torch.equal(c, ref), spec
        torch.testing.assert_close(q.decode(codes), out.z_q, atol=1e-5, rtol=0, msg=str(spec))

    check()
