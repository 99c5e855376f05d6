"""The per-worker training loop: plain PyTorch + DeepSpeed, no Ray import.

    batch (uint8 B,C,T,H,W) -> float [-1, 1] -> objective.step (forward, losses, backward,
    optimiser steps of every engine) -> EMA update -> metrics / checkpoint via the session

The same function runs under Ray Train (`pipelines.train`, one call per worker) and in one
process (`vqtok train --local`, `LocalSession` below): the session is the only difference.
"""

from __future__ import annotations

import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipelines import checkpoint as ckpt
from pipelines.config import Config
from pipelines.evaluate import evaluate, top_level_quantizers
from pipelines.inputs import to_model_input
from pipelines.objectives import build_objective
from pipelines.parallel import autocast, gathered, init_single_process_group, setup_accelerator


class Session(Protocol):
    """What the loop needs from its host (Ray Train, or a plain process)."""

    rank: int
    world_size: int

    def batches(self, epoch: int) -> Iterable[dict]: ...
    def data_metrics(self) -> dict[str, float]: ...
    def restore_dir(self) -> Path | None: ...
    def report(self, metrics: dict, checkpoint: Path | None) -> None: ...
    def eval_batches(self) -> Iterable[dict] | None: ...  # rank 0's validation data
    def log_image(self, image, step: int) -> None: ...
    def export_model(self, model) -> None: ...  # rank 0, at the end: the EMA weights


def seed_everything(seed: int) -> None:
    """Seed 42 for torch, numpy and python on every rank (PVQ-VAE seed, sec. 1.6)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_ranks(flag: bool) -> bool:
    """True only if `flag` holds on every rank (a MIN all-reduce; identity in one process)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    nccl = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    t = torch.tensor([int(flag)], device=torch.cuda.current_device() if nccl else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _batches_forever(session: Session, state: ckpt.TrainState) -> Iterator[dict]:
    """Batches epoch after epoch, in lockstep over ranks: when any rank's shard runs out
    (shards may differ by a batch: skipped samples, uneven splits), every rank ends the
    epoch together, so no rank waits in a collective for a rank that is between epochs."""
    while True:
        stream, got_any = iter(session.batches(state.epoch)), False
        while True:
            batch = next((b for b in stream if b["video"].shape[0] > 0), None)
            if not _all_ranks(batch is not None):
                break
            got_any = True
            yield batch
        state.epoch += 1
        if not _all_ranks(got_any):
            raise RuntimeError(
                "the training data yielded no usable sample in a whole epoch "
                "on some rank; run `vqtok inspect` on the shards"
            )


def train_loop(cfg: Config, session: Session) -> dict[str, float]:
    """Train for cfg.train.steps optimiser steps; returns the last metrics."""
    device = setup_accelerator(cfg.scaling.use_gpu)
    init_single_process_group(device)  # no-op under Ray Train, which made the group
    seed_everything(cfg.train.seed)
    objective = build_objective(cfg, device)
    # the EMA copies the full model before ZeRO-3 partitions it (engines are made after)
    ema_avg = get_ema_multi_avg_fn(cfg.train.ema_decay)
    ema = AveragedModel(objective.model, multi_avg_fn=ema_avg, use_buffers=True)
    objective.init_engines()
    state = ckpt.TrainState(seed=cfg.train.seed)
    restore = session.restore_dir()
    if restore is not None:
        state = ckpt.check_loadable(restore)["state"]
        objective.load(restore)
        ckpt.load_ema(restore, ema)
        if session.rank == 0:
            print(f"[vqtok] resumed from {restore} at step {state.step}", flush=True)
    # every rank draws different augmentations, but reproducibly across a resume
    seed_everything(cfg.train.seed + 1000 * session.rank + state.step)

    log_every, t0, seen0 = cfg.train.log_every, time.perf_counter(), state.samples_seen
    tokens0 = 0
    run_start, first_step = t0, state.step
    metrics: dict[str, float] = {}
    window: Counter = Counter()
    for batch in _batches_forever(session, state):
        if state.step >= cfg.train.steps:
            break
        x = to_model_input(batch["video"], device)
        terms, stepped = objective.micro_step(x, state.step, batch.get("num_frames"))
        state.micro_step += 1
        state.samples_seen += x.shape[0] * session.world_size
        if terms is None:
            state.nonfinite_steps += 1
            continue
        for k, v in terms.items():
            window[k] += float(v)
        window["_n"] += 1
        if not stepped:
            continue
        state.step += 1
        with gathered(objective.model, cfg.train.zero_stage):
            ema.update_parameters(objective.model)
        last = state.step >= cfg.train.steps
        if state.step % log_every == 0 or last:
            elapsed = time.perf_counter() - t0
            n = window.pop("_n")
            metrics = {f"train/{k}": v / n for k, v in window.items()}
            window.clear()
            clips = state.samples_seen - seen0
            metrics.update(
                {
                    "train/lr": objective.lr(),
                    "train/clips_per_s": clips / elapsed,
                    "train/tokens_per_s": (objective.tokens - tokens0)
                    * session.world_size
                    / elapsed,
                    "train/epoch": state.epoch,
                    "train/nonfinite_steps": state.nonfinite_steps,
                    **objective.quantizer_metrics(),
                    **session.data_metrics(),
                }
            )
            if session.rank == 0:
                per_step = (time.perf_counter() - run_start) / max(1, state.step - first_step)
                _progress(state.step, cfg.train.steps, metrics, per_step)
            t0, seen0, tokens0 = time.perf_counter(), state.samples_seen, objective.tokens
        evaluate_now = last or (cfg.train.eval_every and state.step % cfg.train.eval_every == 0)
        if evaluate_now and session.rank == 0:
            metrics.update(run_eval(cfg, session, ema.module, objective, device, state.step))
        path = None
        if state.step % cfg.train.ckpt_every == 0 or last:
            path = save_checkpoint(cfg, session, objective, ema, state)
        if metrics and (state.step % log_every == 0 or path is not None or evaluate_now):
            session.report({**metrics, "step": state.step}, path)
    if session.rank == 0 and state.step >= cfg.train.steps:
        session.export_model(ema.module)
    return metrics


def save_checkpoint(cfg: Config, session: Session, objective, ema, state) -> Path:
    """Every rank writes its engine shards into one staging folder; rank 0 the rest."""
    staging = Path(tempfile.mkdtemp(prefix="vqtok-ckpt-")) / ckpt.step_dir(Path(), state.step).name
    staging.mkdir(parents=True)
    objective.save(staging)
    if session.rank == 0:
        ckpt.write_rank0_files(staging, state, ema, cfg.to_dict())
        for i, q in enumerate(top_level_quantizers(ema.module)):
            q.export_codebook(staging / "codebooks" / f"quantizer{i}")
        ckpt.mark_complete(staging)
    return staging


def run_eval(cfg: Config, session: Session, model, objective, device, step: int) -> dict:
    """Rank 0: metrics of the EMA weights on the validation batches, and a recon grid."""
    batches = session.eval_batches()
    if batches is None:
        return {}
    metrics, media = evaluate(
        model, batches, device, video=objective.video,
        max_batches=cfg.train.eval_batches, autocast=autocast(cfg, device),
    )  # fmt: skip
    if "grid" in media:
        session.log_image(media["grid"], step)
    return metrics


def _progress(step: int, total: int, m: dict, seconds_per_step: float) -> None:
    eta = (total - step) * seconds_per_step
    recon = next((f"  recon {v:.4f}" for k, v in m.items() if k.startswith("train/recon_")), "")
    line = (
        f"[vqtok] step {step}/{total}  loss {m.get('train/total', math.nan):.4f}{recon}  "
        f"{m.get('train/clips_per_s', 0.0):.2f} clips/s  ETA {eta:.0f}s\n"
    )
    # to the raw descriptor: Ray Train V2 tees Python-level streams, which printed it twice
    os.write(sys.stderr.fileno(), line.encode())
