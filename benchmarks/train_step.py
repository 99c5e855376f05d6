"""One tokenizer training step (generator + discriminator) of PVQ-VAE and image tokenizers.

    python -m benchmarks.train_step --device cuda --models pvqvae:default --batch 1 \
        --frames 16 --size 256x256 --dtypes bf16 --compile off,on
    python -m benchmarks.train_step --device cpu --models pvqvae:debug,image_tokenizer:vqvae_debug \
        --frames 4 --size 32x32 --iters 3
    python -m benchmarks.train_step --device cuda --models pvqvae:default --batch 4 --frames 16 \
        --grad-checkpoint --channels-last --fused-optim --compile on --profile runs/prof

Per case (model × dtype × compile) one JSON line: median/p90 ms per step, clips/s, peak
memory, FLOPs per step (`model_flops`: convolutions and matmuls, recomputation excluded),
achieved TFLOP/s and MFU against `--peak-tflops` or the table
below (CUDA only; on CPU, read achieved GFLOP/s). The step is what a trainer runs: forward,
the generator loss of `vqcore.losses.TokenizerLoss` (L1 + quantizer + GAN with VQGAN's adaptive
weight; no LPIPS) and an Adam step, then the discriminator's hinge loss and Adam step. The
discriminator (`vqcore.models.discriminator`) and the losses are imported lazily: without
them the step is L1 + quantizer loss only. bf16 = autocast with fp32 weights.
Options the issue's MFU work asks for: `--grad-checkpoint` (every ResBlock recomputed in
backward), `--channels-last` (channels_last(_3d) weights and input), `--fused-optim` (Adam's
fused kernel), `--profile DIR` (torch.profiler over 3 steps: a Chrome trace in DIR and the
top operators by self time in the JSON line). The quantizer's NaN check (a host sync) is off
(VQCORE_CHECK_FINITE=0), as in vqtok's trainer, whose own check (latents and loss together,
one read per step: `pipelines/training/objectives.py`) this step leaves out.
Runs with torch alone, on CUDA or CPU. Peak memory without a GPU: `train_memory.py`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import device_name, emit, git_rev, measure, sync
from pipelines.data.inputs import autocast
from vqcore.models import model_config
from vqcore.models.blocks import checkpoint_res_blocks

# dense peak TFLOP/s by device-name substring (first match): bf16 tensor cores; fp32 is TF32
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 494.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def peak_tflops(device: torch.device, dtype: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v[dtype] for k, v in PEAK_TFLOPS.items() if k in name), None)


def make_batch(config, args, device: torch.device) -> torch.Tensor:
    """A random batch in [-1, 1] of what the model (`config`, its typed config) codes."""
    h, w = args.size
    video = config.takes_clips
    shape = (args.batch, 3, args.frames, h, w) if video else (args.batch, 3, h, w)
    x = torch.rand(shape, device=device) * 2 - 1
    if args.channels_last:
        x = x.contiguous(memory_format=_memory_format(video))
    return x


def build_case(spec: str, args, device: torch.device):
    """(typed model config, model, discriminator or None, loss or None, optimizers) for
    `type:flavour`."""
    kind, _, flavour = spec.partition(":")
    cfg = {"type": kind, **({"flavour": flavour} if flavour else {})}
    if args.quantizer:
        cfg["quantizer"] = ast.literal_eval(args.quantizer)  # a dict literal
    config = model_config(cfg)
    model = _on(config.build(), device)
    if args.grad_checkpoint:
        checkpoint_res_blocks(model)
    memory_format = _memory_format(config.takes_clips) if args.channels_last else None
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    disc = loss = None
    disc_mod, losses = _optional("vqcore.models.discriminator"), _optional("vqcore.losses")
    if args.disc and disc_mod is not None and not config.step_parts:  # HFSVQ: no GAN
        dspec = {"flavour": "debug"} if flavour.endswith("debug") else {}
        disc = _on(disc_mod.discriminator_config(dspec, config.takes_clips).build(), device)
        if memory_format is not None:
            disc = disc.to(memory_format=memory_format)
    if losses is not None:
        loss = _on(losses.TokenizerLoss(losses.TokenizerLossConfig(perceptual_weight=0.0)), device)
    fused = {"fused": True} if args.fused_optim else {}
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, **fused)
    opt_d = (
        torch.optim.Adam(disc.parameters(), lr=1e-5, betas=(0.9, 0.95), **fused) if disc else None
    )
    return config, model, disc, loss, opt_g, opt_d


def _on(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """module.to(device), skipped when it is there already (under FakeTensorMode `.to` of
    fake parameters fails: "Couldn't swap")."""
    tensors = [*module.parameters(), *module.buffers()]
    return module if all(t.device == device for t in tensors) else module.to(device)


def _memory_format(video: bool) -> torch.memory_format:
    return torch.channels_last_3d if video else torch.channels_last


def make_step(model, fwd, disc, loss, opt_g, opt_d, x, device, dtype):
    """A closure running one generator step and (with a discriminator) one D step: the
    losses of `TokenizerObjective.micro_step` without DeepSpeed, so it runs with torch alone."""

    def step():
        with autocast(device, dtype == "bf16"):
            x_hat, q = fwd(x)
            if loss is None:
                g = F.l1_loss(x_hat.float(), x) + q.loss.float()
            else:
                g = loss.generator(
                    x_hat, x, q.loss, step=1, disc=disc, last_layer=model.last_layer
                ).total
        opt_g.zero_grad(set_to_none=True)
        g.backward()
        opt_g.step()
        if disc is not None and loss is not None:
            with autocast(device, dtype == "bf16"):
                d = loss.discriminator(x_hat.detach(), x, step=1, disc=disc).total
            opt_d.zero_grad(set_to_none=True)
            d.backward()
            opt_d.step()

    return step


_FLOPS: dict[tuple, int] = {}  # per process: cases that differ only in compile count once


def model_flops(spec: str, dtype: str, args) -> int:
    """FLOPs of one training step (convolutions and matmuls, `FlopCounterMode`) with
    recomputation excluded, as MFU counts them (with it, it would be HFU): the step without
    activation checkpointing, run on fake CPU tensors (shapes only: no memory; ~20 s of CPU
    at 4 × 16 × 256²). The nearest-code search counts as the torch path's matmul everywhere."""
    key = (spec, dtype, args.batch, args.frames, args.size, args.disc, args.quantizer)
    if key not in _FLOPS:
        plain = argparse.Namespace(
            **{**vars(args), "grad_checkpoint": False, "channels_last": False}
        )
        cpu = torch.device("cpu")
        with FakeTensorMode():
            config, model, disc, loss, opt_g, opt_d = build_case(spec, plain, cpu)
            x = make_batch(config, plain, cpu)
            step = make_step(model, model, disc, loss, opt_g, opt_d, x, cpu, dtype)
            counter = FlopCounterMode(display=False)
            with counter:
                step()
        _FLOPS[key] = counter.get_total_flops()
    return _FLOPS[key]


def run_case(spec: str, dtype: str, compiled: bool, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    case_name = f"{spec}/{dtype}/{'compiled' if compiled else 'eager'}"
    flops = model_flops(spec, dtype, args)
    config, model, disc, loss, opt_g, opt_d = build_case(spec, args, device)
    x = make_batch(config, args, device)
    if compiled:  # the two networks; the losses' autograd.grad (adaptive weight) stays eager
        fwd, disc = torch.compile(model), torch.compile(disc) if disc is not None else None
    else:
        fwd = model
    step = make_step(model, fwd, disc, loss, opt_g, opt_d, x, device, dtype)
    timing = measure(step, device, warmup=args.warmup, iters=args.iters)
    top_ops = profile(step, device, Path(args.profile) / case_name) if args.profile else None
    seconds = timing["ms_median"] / 1e3
    peak = peak_tflops(device, dtype, args.peak_tflops)
    achieved = flops / seconds / 1e12
    return {
        "bench": "train_step",
        "case": case_name,
        "model": config.name,
        "device": device_name(device),
        "dtype": dtype,
        "compile": compiled,
        "discriminator": disc is not None,
        "grad_checkpoint": args.grad_checkpoint,
        "channels_last": args.channels_last,
        "fused_optim": args.fused_optim,
        "shape": list(x.shape),
        "params_g": sum(p.numel() for p in model.parameters()),
        "params_d": sum(p.numel() for p in disc.parameters()) if disc is not None else 0,
        **timing,
        "clips_per_s": x.shape[0] / seconds,
        "flops_per_step": flops,
        "achieved_tflops": achieved,
        "achieved_gflops": achieved * 1e3,
        "mfu": achieved / peak if peak else None,
        "peak_tflops": peak,
        "top_ops": top_ops,
        "git_rev": git_rev(),
    }


def profile(step, device: torch.device, out: Path, steps: int = 3, top: int = 12) -> list[dict]:
    """torch.profiler over `steps` steps: a Chrome trace in `out`; the `top` operators by self
    time (device time on CUDA) as [{op, calls, self_ms_per_step}]."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    return [
        {"op": e.key, "calls": e.count // steps, "self_ms_per_step": getattr(e, attr) / 1e3 / steps}
        for e in events[:top]
    ]


def parser(description: str) -> argparse.ArgumentParser:
    """The step's options (shared with `train_memory.py`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--models",
        default="pvqvae:default,image_tokenizer:vqvae",
        help="comma list of type:flavour",
    )
    p.add_argument("--quantizer", default=None, help="override, a dict literal")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", default="256x256", help="HxW")
    p.add_argument("--dtypes", default="bf16", help="comma list of fp32, bf16")
    p.add_argument("--compile", default="off", help="comma list of off, on")
    p.add_argument("--no-disc", dest="disc", action="store_false")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing")
    p.add_argument("--channels-last", action="store_true", help="channels_last(_3d) layout")
    p.add_argument("--fused-optim", action="store_true", help="Adam(fused=True)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    for dtype in args.dtypes.split(","):
        if dtype not in ("fp32", "bf16"):
            raise SystemExit(f"--dtypes: unknown dtype {dtype!r} (fp32, bf16)")
    return args


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--profile", default=None, help="folder for a torch.profiler trace per case")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = parse(p, argv)
    os.environ.setdefault("VQCORE_CHECK_FINITE", "0")  # no host sync in the step
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for spec in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for c in args.compile.split(","):
                emit(run_case(spec, dtype, c == "on", args, device))


if __name__ == "__main__":
    main()
