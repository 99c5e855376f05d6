"""Where a training step's time must go on a GPU, before one is lent: a roofline per operator.

    python -m benchmarks.train_roofline --models pvqvae:default --batch 4 --frames 16 \
        --size 256x256 --dtypes bf16

The step is `train_step.py`'s, run once on fake tensors (shapes and dtypes only, nothing is
computed). Every aten operator it dispatches is costed on the roofline of the chosen GPU:

    t_op = max(FLOPs / peak FLOP/s, bytes / memory bandwidth)

with FLOPs from torch's formulas (`torch.utils.flop_counter`: convolutions and matmuls) and
bytes = every input and output tensor read or written once (views cost nothing). The sum is a
lower bound of the eager step (each operator its own kernel, at its own roofline); the JSON
splits it by kind (convolution, matmul, normalisation, FFT, optimizer, casts and copies,
other elementwise) and names the operators with the most bound time, each marked compute-
or memory-bound. What it says is where the time goes if every kernel ran at its roofline:
which parts compilation (fusion of the memory-bound chains) can remove, and the MFU ceiling
without it. It is not a measurement: cuDNN's 3D convolutions reach well below peak, kernels
launch in microseconds, and nothing here saw a GPU.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from benchmarks.common import emit, git_rev
from benchmarks.train_step import (
    PEAK_TFLOPS,
    build_case,
    make_batch,
    make_step,
    model_flops,
    parse,
    parser,
)

# memory bandwidth, TB/s (H100 SXM: HBM3, H200: HBM3e); the dense peaks are PEAK_TFLOPS
HBM_TBPS = {"H100": 3.35, "H200": 4.8}

MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
KINDS = (  # (kind, substrings of the operator's name), first match
    ("convolution", ("convolution",)),
    ("normalisation", ("group_norm", "layer_norm", "batch_norm")),
    ("fft", ("fft",)),
    ("optimizer", ("_foreach_", "_fused_adam")),
    ("cast/copy", ("_to_copy", "copy_", "clone", "cat", "stack")),
)


def kind_of(op: str) -> str:
    """ "aten.convolution_backward" -> "convolution"."""
    name = op.removeprefix("aten.")
    if name in MATMULS:
        return "matmul"
    return next((k for k, keys in KINDS if any(s in name for s in keys)), "elementwise/other")


# not tagged as views, yet they move no data (reshape of a fresh copy returns `_unsafe_view`)
NO_DATA = {"aten._unsafe_view"}
# factories that take a tensor for its metadata only: they write their output, read nothing
LIKE = {"aten.new_zeros", "aten.new_ones", "aten.new_full", "aten.zeros_like", "aten.ones_like"}
LIKE |= {"aten.full_like", "aten.rand_like", "aten.randn_like", "aten.randint_like"}


class RooflineMode(TorchDispatchMode):
    """Records (operator, FLOPs, bytes) of every dispatched aten operator."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        # a kernel: an aten op that makes tensor data (not a view, metadata or an allocation)
        if (
            func.namespace not in ("aten", "vqcore")
            or func.is_view
            or str(packet) in NO_DATA
            or not outputs
            or "empty" in str(packet)
        ):
            return out
        count = flop_registry.get(packet)
        flops = count(*args, **kwargs, out_val=out) if count else 0
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if str(packet) in LIKE:
            inputs = []
        moved = sum(t.numel() * t.element_size() for t in inputs + outputs)
        self.ops.append((str(packet), int(flops), moved))
        return out


def cost_table(ops, peak: float, bandwidth: float, key=lambda name: name) -> dict:
    """Recorded (operator, FLOPs, bytes) summed per `key(operator)` on the roofline of a GPU
    with `peak` FLOP/s and `bandwidth` B/s: {key: {ms, compute_ms, memory_ms, tflop, gb,
    calls}}, ms = Σ max(FLOPs / peak, bytes / bandwidth)."""
    table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name, flops, moved in ops:
        t_compute, t_memory = flops / peak, moved / bandwidth
        row = table[key(name)]
        row["ms"] += max(t_compute, t_memory) * 1e3
        row["compute_ms"] += t_compute * 1e3
        row["memory_ms"] += t_memory * 1e3
        row["tflop"] += flops / 1e12
        row["gb"] += moved / 1e9
        row["calls"] += 1
    return table


def roofline(spec: str, dtype: str, args, gpu: str) -> dict:
    cpu = torch.device("cpu")
    with FakeTensorMode():
        kind, model, disc, loss, opt_g, opt_d = build_case(spec, args, cpu)
        x = make_batch(kind, args, cpu)
        step = make_step(model, model, disc, loss, opt_g, opt_d, x, cpu, dtype)
        step()  # Adam's state exists from the second step on: cost that one
        mode = RooflineMode()
        with mode:
            step()
    peak = PEAK_TFLOPS[gpu][dtype] * 1e12
    bandwidth = HBM_TBPS[gpu] * 1e12
    by_kind = cost_table(mode.ops, peak, bandwidth, kind_of)
    by_op = cost_table(mode.ops, peak, bandwidth)
    total_ms = sum(r["ms"] for r in by_kind.values())
    flops = sum(f for _, f, _ in mode.ops)  # executed: recomputation included
    # MFU's numerator, recomputation excluded: without checkpointing, what ran
    useful = model_flops(spec, dtype, args) if args.grad_checkpoint else flops
    top = sorted(by_op.items(), key=lambda kv: kv[1]["ms"], reverse=True)[: args.top]
    return {
        "shape": list(x.shape),
        "tflop_per_step": flops / 1e12,
        "model_tflop_per_step": useful / 1e12,
        "bound_ms": total_ms,
        # each eager op is a kernel launch of a few µs: what CUDA graphs / compile remove
        "kernels": len(mode.ops),
        "launch_ms_at_5us": len(mode.ops) * 5e-3,
        "mfu_ceiling_eager": useful / peak * 1e3 / total_ms,
        "by_kind": {k: _rounded(v, total_ms) for k, v in _by_time(by_kind)},
        "top_ops": [{"op": k, **_rounded(v, total_ms), "bound": _bound(v)} for k, v in top],
    }


def _by_time(table):
    return sorted(table.items(), key=lambda kv: kv[1]["ms"], reverse=True)


def _bound(row) -> str:
    return "compute" if row["compute_ms"] >= row["memory_ms"] else "memory"


def _rounded(row, total_ms: float) -> dict:
    out = {k: float(f"{v:.4g}") for k, v in row.items()}  # 4 significant digits
    out["share"] = round(row["ms"] / total_ms, 3)
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(device="cpu")
    p.add_argument("--gpu", default="H100", choices=sorted(HBM_TBPS))
    p.add_argument("--top", type=int, default=12, help="operators listed")
    args = parse(p, argv)
    os.environ.setdefault("VQCORE_CHECK_FINITE", "0")  # fake tensors cannot be read back
    for spec in args.models.split(","):
        for dtype in args.dtypes.split(","):
            emit(
                {
                    "bench": "train_roofline",
                    "case": f"{spec}/{dtype}" + ("/ckpt" if args.grad_checkpoint else ""),
                    "gpu": args.gpu,
                    "peak_tflops": PEAK_TFLOPS[args.gpu][dtype],
                    "hbm_tbps": HBM_TBPS[args.gpu],
                    "method": "fake tensors; per op max(FLOPs/peak, bytes/bandwidth), summed",
                    **roofline(spec, dtype, args, args.gpu),
                    "git_rev": git_rev(),
                }
            )


if __name__ == "__main__":
    main()
