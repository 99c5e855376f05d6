"""Distribution and precision, applied after the model is built: process group, DeepSpeed
engines (one per optimiser: generator, discriminator, or HFSVQ's F_L and F_H), the LR
schedule and bf16 autocast (activation checkpointing: `vqcore.models.blocks`). No Ray import.

On CPU DeepSpeed runs with its CPU accelerator over gloo (`DS_ACCELERATOR=cpu`) in fp32; on
GPUs the forward runs under bf16 autocast with fp32 master weights and fp32 loss reductions
(PVQ-VAE seed, sec. 1.2). Optimiser: torch's Adam/AdamW, fused (`optim.fused`, CPU and
CUDA), handed to DeepSpeed (DeepSpeed's own fused CPU Adam fails on CPU here, docs/RUNTIME.md), so
ZeRO shards it the same way.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from pipelines.cluster.connect import verbose
from pipelines.config import Config


def setup_accelerator(use_gpu: bool) -> torch.device:
    """Pick the device; must run before `import deepspeed` for the CPU accelerator."""
    # DeepSpeed 0.19 calls a deprecated torch.distributed function on every ZeRO step
    for fn in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=f".*{fn}.*", category=FutureWarning)
    # DeepSpeed JIT-builds its CPU comm op once (~30-90 s); a cache of our own survives runs
    # and is not rebuilt by other projects' build flags on the same machine
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vqtok" / "torch_extensions")
    )
    if use_gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cpu")


def init_single_process_group(device: torch.device) -> None:
    """A world of one for runs without Ray or a launcher (DeepSpeed needs a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # a fresh port for a world of one: one inherited from a parent that trained in the same
    # way (e.g. `vqtok ablate --local` pool workers) would be in use
    if "MASTER_PORT" not in os.environ or os.environ.get("WORLD_SIZE", "1") == "1":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def host_group():
    """The process group for flags the host already holds (the data lockstep): the default
    group on gloo, else a gloo group over the same ranks. Over NCCL such a flag would be a
    CUDA tensor, and reading the result back would wait for the GPU's whole queue: a stall
    every micro-step. Every rank must call this at the same point (`train_loop`'s start)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def use_bf16(cfg: Config, device: torch.device) -> bool:
    if cfg.train.precision == "auto":
        return device.type == "cuda"
    return cfg.train.precision == "bf16"


def lr_lambda(warmup: int, total: int):
    """Linear warmup to 1, then linear decay to 0 at `total` (PVQ-VAE seed, sec. 1.3)."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def deepspeed_config(cfg: Config, micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        # weights stay fp32 (master); bf16 comes from autocast around the forward
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def _without_stdout_lines(text: str):
    """The block's stdout, less the lines containing `text`: for a library's `print` that no
    logger filters (under Ray Train, `print` is also logged: `launch._quiet_worker` filters
    that copy). Everything with `--verbose`."""
    if verbose():
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        sys.stdout.write("".join(x for x in buf.getvalue().splitlines(True) if text not in x))


def make_engine(
    module: nn.Module, params: Iterable[nn.Parameter], cfg: Config, lr: float, micro_batch: int
):
    """A DeepSpeed engine over `module` that steps `params` with Adam(W) + warmup/decay."""
    import deepspeed

    params = [p for p in params if p.requires_grad]
    o = cfg.optim
    opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                  fused=o.fused)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, cfg.train.steps))
    with _without_stdout_lines("built successfully"):  # DeepSpeed prints it per engine
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=opt,
            lr_scheduler=sched,
            config=deepspeed_config(cfg, micro_batch),
        )
    from pipelines.store.checkpoint import safe_engine_loading

    safe_engine_loading(engine)  # DeepSpeed's loader would unpickle a planted file
    return engine


@contextlib.contextmanager
def gathered(module: nn.Module, zero_stage: int):
    """Full parameters of a ZeRO-3 module inside the block (identity below stage 3)."""
    if zero_stage < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield
