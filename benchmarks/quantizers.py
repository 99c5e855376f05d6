"""Forward + backward of every quantizer family, side by side with vector-quantize-pytorch.

    python -m benchmarks.quantizers --device cuda --tokens 65536          # all cases
    python -m benchmarks.quantizers --device cpu --tokens 8192 --cases vq_d256_k8192_ema
    python -m benchmarks.quantizers --fused off      # the chunked torch search on CUDA too
    python -m benchmarks.quantizers --compile on --no-reference   # ours under torch.compile
    python -m benchmarks.quantizers --roofline H100 --tokens 65536   # no GPU: an H100 model

The issue-8 targets: vq_d256_k8192_ema; looc_d256_m32_k256 against vector-quantize-pytorch's
32 heads x dim 8 sharing one 256-code codebook; lfq_2^16 (entropy loss on); hrvq_d256_2x90
against vq_d256_k8100_flat (8,100 leaves each); rvq_d256_4x1024 against ResidualVQ.
`--fused` sets VQCORE_FUSED (auto: the Triton kernel for CUDA tensors when triton imports).
The quantizers' NaN check (a host sync) is off (VQCORE_CHECK_FINITE=0), as in a compiled step.

Prints one JSON object per line (case, impl, device, dtype, shape, ms, peak memory,
tokens/s, git revision). Runs with torch alone; the vector-quantize-pytorch rows appear
when `vector_quantize_pytorch` is importable (pip install "vector-quantize-pytorch==1.32.0").
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

from benchmarks.common import device_name, emit, git_rev, measure
from vqcore.ops.nearest import use_fused
from vqcore.quantizers import build

# case -> (channels D, our config, vector-quantize-pytorch constructor or None)
CASES: dict[str, tuple[int, dict, Callable | None]] = {
    "vq_d256_k8192_ema": (
        256,
        {"type": "vq", "codebook_size": 8192, "update": "ema"},
        lambda m: m.VectorQuantize(dim=256, codebook_size=8192, decay=0.99),
    ),
    "looc_d256_m32_k256": (
        256,
        {"type": "looc", "codebook_dim": 8, "codebook_size": 256, "alpha": 1},
        lambda m: m.VectorQuantize(
            dim=256, codebook_size=256, codebook_dim=8, heads=32, decay=0.99
        ),  # one codebook shared by the 32 heads (separate_codebook_per_head=False)
    ),
    "looc_d256_m32_k256_nocvq": (  # like for like with the reference: no re-anchoring
        256,
        {"type": "looc", "codebook_dim": 8, "codebook_size": 256, "alpha": 1, "cvq": False},
        None,
    ),
    "looc_d256_m32_k256_alpha2": (
        256,
        {"type": "looc", "codebook_dim": 8, "codebook_size": 256, "alpha": 2},
        None,
    ),
    "rvq_d256_4x1024": (
        256,
        {
            "type": "rvq",
            "num_quantizers": 4,
            "inner": {"type": "vq", "codebook_size": 1024, "update": "ema"},
        },
        lambda m: m.ResidualVQ(dim=256, num_quantizers=4, codebook_size=1024, decay=0.99),
    ),
    "lfq_2^14": (14, {"type": "lfq"}, lambda m: m.LFQ(dim=14, codebook_size=2**14)),
    "lfq_2^16": (16, {"type": "lfq"}, lambda m: m.LFQ(dim=16, codebook_size=2**16)),
    "fsq_8x8x8x5x5x5": (
        6,
        {"type": "fsq", "levels": [8, 8, 8, 5, 5, 5]},
        lambda m: m.FSQ([8, 8, 8, 5, 5, 5]),
    ),
    "hrvq_d256_2x90": (256, {"type": "hrvq", "num_layers": 2, "codebook_size": 90}, None),
    "vq_d256_k8100_flat": (256, {"type": "vq", "codebook_size": 8100, "update": "ema"}, None),
    "pq_d256_s4_k16": (256, {"type": "pq", "num_subspaces": 4, "codebook_size": 16}, None),
    "gvq_d256_k4096": (256, {"type": "gvq", "codebook_size": 4096}, None),
    "pyramid_lfq_d16": (16, {"type": "pyramid", "inner": {"type": "lfq"}}, None),
    "rvq_lfq_d16": (16, {"type": "rvq_lfq"}, None),
}


def _ours(spec: dict, dim: int, z: torch.Tensor, compiled: bool = False):
    q = build({**spec, "dim": dim}).to(z.device).train()
    return _train_step(torch.compile(q) if compiled else q, z)


def _train_step(q, z: torch.Tensor):
    """One forward + backward of quantizer `q` on `z`, as every case is timed or costed."""

    def step():
        z.grad = None
        out = q(z)
        (out.z_q.square().mean() + out.loss).backward()

    return step


def _theirs(ctor: Callable, z: torch.Tensor):
    import vector_quantize_pytorch

    q = ctor(vector_quantize_pytorch).to(z.device).train()
    x = z.detach().flatten(2).transpose(1, 2).contiguous().requires_grad_()  # (B, N, D)

    def step():
        x.grad = None
        out = q(x)
        zq, loss = out[0], out[-1]
        loss = loss.sum() if torch.is_tensor(loss) else 0.0
        (zq.square().mean() + loss).backward()

    return step


def _roofline(spec: dict, dim: int, shape: tuple, gpu: str, top: int = 5) -> dict:
    """The case's training step on fake tensors with the fused search, every operator costed
    on `gpu`'s roofline (benchmarks/train_roofline.py): fp32 inputs, so tf32 peak."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from benchmarks.train_roofline import HBM_TBPS, RooflineMode, cost_table
    from benchmarks.train_step import PEAK_TFLOPS

    peak, bandwidth = PEAK_TFLOPS[gpu]["fp32"] * 1e12, HBM_TBPS[gpu] * 1e12
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = build({**spec, "dim": dim}).train()
        z = torch.randn(shape, requires_grad=True)
        step = _train_step(q, z)
        step()  # the next steps have EMA/usage state and z.grad, as a timed step does
        mode = RooflineMode()
        with mode:
            step()
        tracker = MemTracker()  # apart from the roofline's mode (nesting modes skews peaks)
        tracker.track_external(q, z)
        with tracker:
            step()
        memory = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    by_op = {k: row["ms"] for k, row in cost_table(mode.ops, peak, bandwidth).items()}
    ranked = sorted(by_op.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return {
        "bound_ms": sum(by_op.values()),
        "search_ms": by_op.get("vqcore.nearest_code_launch", 0.0),
        "gflop": sum(f for _, f, _ in mode.ops) / 1e9,
        "kernels": len(mode.ops),
        # live tensors at the step's peak, the input and the quantizer's state included:
        # what torch.cuda.max_memory_allocated would say, less the allocator's rounding
        "peak_gib": memory["Total"] / 2**30,
        "top_ops": [{"op": k, "ms": round(v, 4)} for k, v in ranked],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=None, help="N per call (cuda 65536, cpu 8192)")
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-reference", action="store_true", help="skip vector-quantize-pytorch")
    p.add_argument(
        "--fused",
        choices=("auto", "on", "off"),
        default="auto",
        help="fused Triton nearest-code search (VQCORE_FUSED); on needs CUDA + triton",
    )
    p.add_argument("--compile", choices=("off", "on"), default="off", help="torch.compile ours")
    p.add_argument(
        "--roofline",
        choices=("H100", "H200"),
        default=None,
        help="no timing: cost our step per operator on this GPU's roofline (fake tensors)",
    )
    args = p.parse_args(argv)
    os.environ["VQCORE_FUSED"] = args.fused
    os.environ.setdefault("VQCORE_CHECK_FINITE", "0")  # its NaN check is a host sync per call
    if args.roofline:
        # the fused search's path on CPU fake tensors: its custom op's fake runs, no kernel
        os.environ.update(VQCORE_FUSED="on", TRITON_INTERPRET="1")
        args.device, args.no_reference = "cpu", True
    device = torch.device(args.device)
    n = args.tokens or (65536 if device.type == "cuda" else 8192)
    side = 32 if n % 1024 == 0 else 1
    try:
        import vector_quantize_pytorch  # noqa: F401

        have_ref = not args.no_reference
    except ImportError:
        have_ref = False
    try:  # what nearest_code takes for tensors on this device
        fused = use_fused(torch.zeros(1, device=device))
    except RuntimeError as exc:  # --fused on where it cannot run: every case reports the error
        fused = f"error: {exc}"
    common = {
        "device": device_name(device),
        "dtype": "float32",
        "tokens": n,
        "fused_search": fused,
        "compile": args.compile == "on",
        "git": git_rev(),
    }
    for case in args.cases:
        dim, spec, ctor = CASES[case]
        torch.manual_seed(0)
        shape = (n // (side * side), dim, side, side)
        z = torch.randn(shape, device=device, requires_grad=True)
        runs = [("vqtok", _ours, (spec, dim, z, args.compile == "on"))]
        if have_ref and ctor:
            runs.append(("vector-quantize-pytorch", _theirs, (ctor, z)))
        if args.roofline:
            rec = {"case": case, "impl": "vqtok", "shape": list(shape), **common}
            emit({**rec, "roofline": args.roofline, **_roofline(spec, dim, shape, args.roofline)})
            continue
        for impl, make, make_args in runs:
            rec = {"case": case, "impl": impl, "shape": list(shape), **common}
            try:
                stats = measure(make(*make_args), device, iters=args.iters)
                rec.update(stats, tokens_per_s=n / (stats["ms_median"] / 1e3))
            except torch.OutOfMemoryError:
                rec["error"] = "out of memory"
            except Exception as exc:  # report and go on: one broken case must not hide the rest
                rec["error"] = f"{type(exc).__name__}: {exc}"
            emit(rec)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
