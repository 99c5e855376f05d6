"""Peak memory of one training step, estimated without the memory: fake tensors, real shapes.

    python -m benchmarks.train_memory --models pvqvae:default --batch 4 --frames 16 \
        --size 256x256 --dtypes bf16 --checkpointing off,on
    python -m benchmarks.train_memory --models pvqvae:default --batch 1 --frames 96 --checkpointing on
    python -m benchmarks.train_memory --models pvqvae:default --frames 16 --size 64x64 \
        --dtypes fp32 --checkpointing off --real

The step is `train_step.py`'s (generator loss and Adam step, then the discriminator's), run
twice under `torch._subclasses.FakeTensorMode` (no tensor data is allocated, so a 96-frame
256² clip is measured on a laptop) inside torch's `MemTracker`
(`torch.distributed._tools.mem_tracker`), which follows every storage's lifetime and reports
the peak with its split into parameters, gradients, optimizer state, activations and
temporaries. The second step counts: it is the first with Adam's moments alive.

What it is and is not: live tensor bytes rounded up to 512 B blocks, as the CUDA caching
allocator rounds them; not allocator fragmentation or cached free blocks, cuDNN/cuBLAS
workspaces, or the CUDA context (~0.5 GiB). Read it as a lower bound of
`torch.cuda.max_memory_allocated` and check it on the GPU with `train_step.py`. Without a
GPU, `--real` runs the same steps on real CPU tensors and reports the growth of the
process's max RSS beside the tracker's peak (one case per process, run it at a size that
fits in RAM). One JSON line per case (model × dtype × checkpointing), with the step's FLOPs
(`train_step.model_flops`) and the step time an H100 must reach for `--mfu-goal`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

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

GIB = 2**30


class StepMemTracker(MemTracker):
    """MemTracker for a GAN step: it takes a second call of a top-level module for the next
    iteration and raises, but the discriminator is called in the generator's step and again
    in its own. Module stats are only attribution; the peak, which we read, is tracked per
    operator by the dispatch mode regardless."""

    def _pre_fw_hook(self, module, inputs) -> None:  # private hook, torch 2.14
        try:
            super()._pre_fw_hook(module, inputs)
        except NotImplementedError:
            pass


def estimate(spec: str, dtype: str, args, steps: int = 2, fake: bool = True) -> dict:
    """Peak of `steps` training steps of `spec` under fake tensors: {total, by kind} bytes.
    `fake=False` runs the same steps on real CPU tensors and adds the growth of the process's
    max RSS over the steps (`rss_growth`): a check of the tracker that does not rely on it."""
    device = torch.device("cpu")  # fake: shapes and dtypes only, nothing is computed
    with FakeTensorMode() if fake else contextlib.nullcontext():
        config, model, disc, loss, opt_g, opt_d = build_case(spec, args, device)
        x = make_batch(config, args, device)
        step = make_step(model, model, disc, loss, opt_g, opt_d, x, device, dtype)
        tracker = StepMemTracker()
        tracker.track_external(*(m for m in (model, disc, loss, opt_g, opt_d, x) if m is not None))
        # MemTracker puts its gradient hooks on a module's parameters at its first call, and
        # fails on parameters that are frozen then (the discriminator is, in the generator
        # step, which calls it first): put them on beforehand (private API, torch 2.14)
        for module in (model, disc):
            if module is not None:
                tracker._track_module_params_and_buffers(module, install_grad_hooks=True)
        rss0 = _max_rss()
        with tracker:
            for _ in range(steps):
                step()
                tracker.reset_mod_stats()  # per-module stats are per step; the peak is kept
        peak = tracker.get_tracker_snapshot("peak")[device]
    by_kind = {str(k.value if hasattr(k, "value") else k).lower(): int(v) for k, v in peak.items()}
    out = {"shape": list(x.shape), "params_g": sum(p.numel() for p in model.parameters()),
           "bytes": by_kind}  # fmt: skip
    if not fake:
        out["rss_growth"] = _max_rss() - rss0
    return out


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(device="cpu")
    p.add_argument("--checkpointing", default="off,on", help="comma list of off, on")
    p.add_argument(
        "--real", action="store_true", help="real CPU tensors (one case per process: max RSS)"
    )
    p.add_argument("--mfu-goal", type=float, default=0.35, help="for h100_ms_per_step_at_mfu_goal")
    args = parse(p, argv)
    # the quantizer's NaN check reads data back, which fake tensors do not have
    os.environ.setdefault("VQCORE_CHECK_FINITE", "0")
    for spec in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for ck in args.checkpointing.split(","):
                args.grad_checkpoint = ck == "on"
                t0 = time.perf_counter()
                est = estimate(spec, dtype, args, fake=not args.real)
                total = est["bytes"].pop("total")
                rss = est.get("rss_growth")
                flops = model_flops(spec, dtype, args)
                goal_tflops = args.mfu_goal * PEAK_TFLOPS["H100"][dtype]
                emit(
                    {
                        "bench": "train_memory",
                        "case": f"{spec}/{dtype}/ckpt-{ck}",
                        "method": ("real CPU tensors" if args.real else "FakeTensorMode")
                        + " + MemTracker (live tensors, 512 B blocks)",
                        "dtype": dtype,
                        "grad_checkpoint": args.grad_checkpoint,
                        "discriminator": args.disc,
                        "shape": est["shape"],
                        "params_g": est["params_g"],
                        "peak_gib": total / GIB,
                        "peak_gib_by_kind": {k: v / GIB for k, v in est["bytes"].items()},
                        "max_rss_growth_gib": None if rss is None else rss / GIB,
                        "tflop_per_step": flops / 1e12,  # recomputation excluded
                        # the step time an H100 must reach for --mfu-goal (issue 8: 35 %)
                        "h100_ms_per_step_at_mfu_goal": flops / goal_tflops / 1e9,
                        "seconds": time.perf_counter() - t0,
                        "git_rev": git_rev(),
                    }
                )


if __name__ == "__main__":
    main()
