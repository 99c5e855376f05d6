"""Does each model family learn? Train its CPU (debug) model in one process on real shards for
a fixed budget and print, per family, the validation curve beside the trivial references at
its own rate, as JSON lines (issue 25; figures in BENCHMARKS.md, "Learning").

    python -m benchmarks.learning                           # every family, demo data
    python -m benchmarks.learning --families pvqvae conv_ae --steps 1200 --every 200

One line per family: `curve` (step, PSNR dB on the held-out frames), the final `psnr`/`ssim`,
`bits_per_pixel`, `compression_ratio`, `reference_*` (each clip's mean colour and bicubic
down/up on the same frames; `reference_rate_psnr` is the bicubic that keeps no more values
than the model, the one to beat) and `beats_rate`. Families: the debug PVQ-VAE (its PVQ, FSQ
at a rate near PVQ's, and unquantized: `pvqvae_trunk`), the image tokenizers, HFSVQ, and
`conv_ae`: a plain per-frame conv autoencoder of the PVQ-VAE's width, unquantized, the
reference a trunk must be near.

The recipe is the trainer's core without the GAN: Adam (betas 0.9, 0.95), linear warm-up then
linear decay, gradients clipped at norm 1, L1 (`--recon l2`: L2) + the quantizer's loss, no loss
on padding (the data path gives images their own T = 1 batches). HFSVQ follows its seed's
Algorithm 1: both halves step on the same batch, F_L first. The curve scores the trainer's
warmed-up EMA of the weights (`pipelines.training.loop.warmup_ema`) on the val clips' first
`val_frames` frames (centred crops; by default as many as a training clip has).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import device_name, emit, git_rev
from pipelines.data.batches import DataConfig
from pipelines.data.inputs import fold_frames, to_model_input
from pipelines.data.stream import iter_batches
from pipelines.inference.evaluate import EvalAccumulator
from pipelines.training.loop import warmup_ema
from pipelines.training.parallel import lr_lambda
from vqcore.losses import reconstruction_loss
from vqcore.metrics import MetricsConfig
from vqcore.models import build_model
from vqcore.models.blocks import Decoder, Encoder, stage_strides
from vqcore.quantizers import Quantized

# the demo's PVQ (jobs/demo.yaml): LFQ's entropy weight 0.02 for batches of a few clips
PVQ = {"type": "pyramid", "inner": {"type": "lfq", "entropy_weight": 0.02}, "scales": [4, 2, 1]}
# 8·8·8·5·5·5 = 64,000 codes: 15.97 bits a position, within 25 % of PVQ's 16·(1 + 1/4 + 1/16)
FSQ_NEAR_PVQ = {"type": "fsq", "levels": [8, 8, 8, 5, 5, 5]}

FAMILIES: dict[str, dict[str, Any]] = {
    "conv_ae": {"type": "conv_ae"},
    "pvqvae_trunk": {"type": "pvqvae", "flavour": "debug", "quantizer": "none"},
    "pvqvae": {"type": "pvqvae", "flavour": "debug", "quantizer": PVQ},
    "pvqvae_fsq": {"type": "pvqvae", "flavour": "debug", "quantizer": FSQ_NEAR_PVQ},
    "vqvae": {"type": "image_tokenizer", "flavour": "vqvae_debug"},
    "looc_vae": {"type": "image_tokenizer", "flavour": "looc_vae_debug"},
    # LooC at PQ-VAE's rate (16 bits a latent position: m 4 × log2 16, α 1): the debug
    # flavour's α 2 stores its codes on the ×2 grid, as many bits as the pixels (ratio 1)
    "looc_vae_rate6": {
        "type": "image_tokenizer",
        "flavour": "looc_vae_debug",
        "quantizer": {"type": "looc", "codebook_size": 16, "alpha": 1},
    },
    "hrvq_vae": {"type": "image_tokenizer", "flavour": "hrvq_vae_debug"},
    "pq_vae": {"type": "image_tokenizer", "flavour": "pq_vae_debug"},
    "hfsvq": {"type": "hfsvq", "flavour": "debug"},
}
VIDEO = {"pvqvae", "conv_ae"}  # families that take clips (the others see frames as images)


class Unquantized(nn.Module):
    """Stands in for a model's quantizer to train its trunk as a plain autoencoder."""

    def forward(self, z: torch.Tensor) -> Quantized:
        return Quantized(z, torch.zeros(0, dtype=torch.long), z.new_zeros(()), {})


class ConvAE(nn.Module):
    """Per-frame 2D conv autoencoder at the debug PVQ-VAE's width (16 channels, ×(1, 2, 2),
    one ResBlock a level, GroupNorm, ×4 down, 16-d latent), unquantized: `vqcore` blocks."""

    def __init__(self, channels: int = 16, latent_dim: int = 16):
        super().__init__()
        net = dict(channels=channels, channel_mult=(1, 2, 2), num_res_blocks=1,
                   strides=stage_strides(4, 1, dims=2), norm="group", norm_groups=8)  # fmt: skip
        self.encoder, self.decoder = Encoder(2, 3, latent_dim, **net), Decoder(2, latent_dim, 3, **net)

    def forward(self, x_bcthw: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        t = x_bcthw.shape[2]
        y = self.decoder(self.encoder(fold_frames(x_bcthw)))
        y = y.reshape(-1, t, *y.shape[1:]).transpose(1, 2)
        return y, Unquantized()(y)


def build(spec: dict[str, Any]) -> nn.Module:
    spec = dict(spec)
    if spec["type"] == "conv_ae":
        return ConvAE()
    unquantized = spec.get("quantizer") == "none"
    if unquantized:
        spec.pop("quantizer")
    model = build_model(spec)
    if unquantized:
        model.quantizer = Unquantized()
    return model


@dataclass
class Budget:
    steps: int = 800
    every: int = 200
    lr: float = 2e-3
    warmup: int = 50
    grad_clip: float = 1.0
    batch_size: int = 4
    resolution: int = 32
    frames: int = 4
    val_frames: int = 0  # 0: the training length (a model trained on 4-frame clips is scored
    # on 4-frame windows; see BENCHMARKS.md "Learning" for what longer windows do)
    ema_decay: float = 0.99
    seed: int = 0
    recon: str = "l1"  # or "l2": L1 alone leaves the PVQ-VAE grey for long (BENCHMARKS.md "Colour")


def _schedule(opt: torch.optim.Optimizer, b: Budget) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(b.warmup, b.steps))  # the trainer's


def _step_fns(model: nn.Module, lr: float, recon: str = "l1"):
    """[(optimiser, loss_fn(x))]: one pair, or one per part of a model whose step updates
    its parts in turn (`step_parts`: HFSVQ's two halves, seed 000, Algorithm 1, each with its
    own loss; `recon` is the others' reconstruction term). Adam with the trainer's defaults
    (`OptimConfig`: betas (0.9, 0.95))."""
    adam = lambda params: torch.optim.Adam(params, lr, betas=(0.9, 0.95))  # noqa: E731
    parts = getattr(getattr(model, "config", None), "step_parts", ())  # ConvAE has no config
    if parts:
        return [(adam(model.part_parameters(p)), lambda x, p=p: model.part_loss(p, x).loss)
                for p in parts]  # fmt: skip

    def loss(x: torch.Tensor) -> torch.Tensor:
        x_hat, q = model(x)
        return reconstruction_loss(x_hat, x, recon) + q.loss

    return [(adam(model.parameters()), loss)]


def data(folder: Path, split: str, b: Budget, center: bool) -> DataConfig:
    val_frames = b.val_frames or b.frames
    return DataConfig(shards=(str(folder / f"{split}-*.tar"),), resolutions=((b.resolution,) * 2,),
                      frame_counts=(val_frames if center else b.frames,),
                      batch_size=8 if center else b.batch_size,
                      memory_budget_bytes=1 << 26, seed=b.seed, center=center)  # fmt: skip


@torch.no_grad()
def evaluate(model: nn.Module, val: list[dict], video: bool) -> dict[str, float]:
    acc = EvalAccumulator(model, torch.device("cpu"), video=video,
                          metrics_config=MetricsConfig(fid=False, lpips=None))  # fmt: skip
    for batch in val:
        acc.update(batch)
    return acc.compute()


def train(spec: dict[str, Any], folder: Path, b: Budget, video: bool) -> dict[str, Any]:
    """Train `spec`'s model on `folder`'s train shards; the curve on its val shards."""
    torch.manual_seed(b.seed)
    model = build(spec)
    steps = [(opt, fn, _schedule(opt, b)) for opt, fn in _step_fns(model, b.lr, b.recon)]
    ema = warmup_ema(model, b.ema_decay)  # evaluated, as the trainer evaluates its EMA
    val = [v for v in iter_batches(data(folder, "val", b, center=True)) if len(v["keys"])]
    curve, step, epoch, t0 = [], 0, 0, time.perf_counter()
    while step < b.steps:
        for batch in iter_batches(data(folder, "train", b, center=False), epoch):
            if not len(batch["keys"]):
                continue
            x = to_model_input(batch["video"], torch.device("cpu"))
            x = x[:, :, : int(batch["num_frames"].min())]  # no loss on padding (as the trainer)
            x = x if video else fold_frames(x)
            for opt, fn, sched in steps:
                loss = fn(x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, b.grad_clip)  # as DeepSpeed's
                opt.step()
                sched.step()
            ema.update_parameters(model)
            step += 1
            if step % b.every == 0 or step == b.steps:
                curve.append((step, round(evaluate(ema.module, val, video)["eval/psnr"], 2)))
            if step >= b.steps:
                break
        epoch += 1
    final = evaluate(ema.module, val, video)
    out = {k[5:]: v for k, v in final.items() if k.startswith("eval/") and "/" not in k[5:]
           and isinstance(v, float) and (k[5:] in KEEP or k[5:].startswith("reference_"))}  # fmt: skip
    if "compression_ratio" in out:
        out["bits_per_pixel"] = 24.0 / out["compression_ratio"]
    return {"curve": curve, **out, "train_s": round(time.perf_counter() - t0, 1)}


KEEP = {"psnr", "ssim", "chroma_kept", "compression_ratio", "bits_per_token", "codebook_usage",
        "beats_rate"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--data", type=Path, default=Path("demo_data"),
                   help="a folder of train-*.tar / val-*.tar (made with `vqtok demo-data` "
                        "if missing)")  # fmt: skip
    for name, default in vars(Budget()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = p.parse_args(argv)
    if not any(args.data.glob("train-*.tar")):
        from pipelines.data.demo_data import make_demo_data

        make_demo_data(args.data)
    budget = Budget(**{k: getattr(args, k) for k in vars(Budget())})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for family in args.families:
        result = train(FAMILIES[family], args.data, budget, video=FAMILIES[family]["type"] in VIDEO)
        emit({"bench": "learning", "family": family, "data": str(args.data), **vars(budget),
              **result, "device": device_name(torch.device("cpu")), "rev": git_rev()})


if __name__ == "__main__":
    main()
