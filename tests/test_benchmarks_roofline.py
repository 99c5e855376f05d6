"""benchmarks/train_roofline.py: the per-operator cost model behind BENCHMARKS.md's roofline."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.train_roofline import RooflineMode, kind_of, roofline
from benchmarks.train_step import model_flops, parse, parser


def test_one_matmul_costs_its_flops_and_bytes():
    with FakeTensorMode():
        a, b = torch.empty(64, 32), torch.empty(32, 16, dtype=torch.float32)
        mode = RooflineMode()
        with mode:
            c = a @ b
            c.t().reshape(-1)  # a view, then a copy of the non-contiguous view
            c.new_zeros(())  # reads nothing of c
    ops = {name: (flops, moved) for name, flops, moved in mode.ops}
    assert ops["aten.mm"] == (2 * 64 * 32 * 16, 4 * (64 * 32 + 32 * 16 + 64 * 16))
    assert "aten.t" not in ops and "aten.view" not in ops  # views move nothing
    assert "aten._unsafe_view" not in ops  # reshape's view of its copy: not tagged a view
    assert ops["aten.new_zeros"] == (0, 4)  # writes one float
    assert ops["aten.clone"][1] == 2 * 4 * 64 * 16  # read and written once


@pytest.mark.parametrize(
    "op, kind",
    [
        ("aten.convolution_backward", "convolution"),
        ("aten.addmm", "matmul"),
        ("aten.native_layer_norm_backward", "normalisation"),
        ("aten._fft_r2c", "fft"),
        ("aten._foreach_mul_", "optimizer"),
        ("aten._to_copy", "cast/copy"),
        ("aten.silu_backward", "elementwise/other"),
    ],
)
def test_operator_kinds(op, kind):
    assert kind_of(op) == kind


def test_step_bound_adds_up(monkeypatch):
    """Debug PVQ-VAE step: kinds sum to the bound, each between max and sum of its compute
    and memory times; without checkpointing every FLOP executed is a model FLOP."""
    monkeypatch.setenv("VQCORE_CHECK_FINITE", "0")
    args = parse(parser("t"), ["--models", "pvqvae:debug", "--frames", "4", "--size", "32x32"])
    args.top = 5
    r = roofline("pvqvae:debug", "bf16", args, "H100")
    kinds = r["by_kind"]
    assert sum(v["ms"] for v in kinds.values()) == pytest.approx(r["bound_ms"], rel=2e-3)
    for v in kinds.values():
        assert max(v["compute_ms"], v["memory_ms"]) <= v["ms"] * 1.001
        assert v["ms"] <= (v["compute_ms"] + v["memory_ms"]) * 1.001
    assert r["tflop_per_step"] == r["model_tflop_per_step"]
    assert r["model_tflop_per_step"] * 1e12 == model_flops("pvqvae:debug", "bf16", args)
    assert kinds["convolution"]["tflop"] > 0 and 0 < r["mfu_ceiling_eager"] < 1
    assert len(r["top_ops"]) == 5


def test_quantizer_roofline_counts_the_fused_search(capsys, monkeypatch):
    """`quantizers.py --roofline`: the fused search is one costed operator (its FLOP formula
    is registered with torch's counter) and HR-VQ's local search costs a fraction of the
    flat search over as many leaves, as the HR-VQVAE seed claims (about 6x faster), at 65,536
    tokens (at 4,096 both are bound by reading codebooks of the same size, 8 MB)."""
    import json

    from benchmarks import quantizers

    # main() sets these in the process, as a CLI may: setenv records them so that the
    # teardown restores them (delenv of an absent key records nothing: they would leak)
    for key, value in (("VQCORE_FUSED", "auto"), ("TRITON_INTERPRET", "0"),
                       ("VQCORE_CHECK_FINITE", "0")):  # fmt: skip
        monkeypatch.setenv(key, value)
    quantizers.main(["--roofline", "H100", "--tokens", "65536",
                     "--cases", "hrvq_d256_2x90", "vq_d256_k8100_flat"])  # fmt: skip
    rows = {r["case"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    tree, flat = rows["hrvq_d256_2x90"], rows["vq_d256_k8100_flat"]
    assert flat["gflop"] * 1e9 >= 2 * 65536 * 8100 * 256  # the search alone
    assert 0 < tree["search_ms"] < flat["search_ms"] / 5
    # the step's peak of live tensors holds at least the input and its gradient, and the
    # fused search adds no N x K matrix (the goal for vq: <= 1 GiB)
    assert 2 * 65536 * 256 * 4 <= flat["peak_gib"] * 2**30 < 2**30
