"""The per-worker training loop: plain PyTorch + DeepSpeed, no Ray import.

    batch (uint8 B,C,T,H,W) -> float [-1, 1] -> objective.step (forward, losses, backward,
    optimiser steps of every engine) -> EMA update -> metrics / checkpoint via the session

The same function runs under Ray Train (`pipelines.training.launch`, one call per worker) and in one
process (`vqtok train --local`, `LocalSession` below): the session is the only difference.

Resuming is exact: the RNGs are reseeded before every micro-step from (seed, rank,
micro-step), and a resume reads and drops the batches of the current epoch the checkpoint
had already consumed (`TrainState.batches_in_epoch`; the batch order is a function of seed
and epoch), so a restarted run sees the batches and random draws an uninterrupted one would.

Non-finite losses skip the step on every rank (`objectives`), are counted
(`train/nonfinite_steps`) and, after `train.max_nonfinite_steps` in a row, stop the run with
`NonFiniteLossError` and a checkpoint of the weights from before the first of them.
"""

from __future__ import annotations

import io
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pipelines.config import Config
from pipelines.data.inputs import autocast, to_model_input
from pipelines.inference.evaluate import evaluate, top_level_quantizers
from pipelines.store import checkpoint as ckpt
from pipelines.training.objectives import build_objective
from pipelines.training.parallel import (
    gathered,
    host_group,
    init_single_process_group,
    setup_accelerator,
    use_bf16,
)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the message names the steps and the checkpoint."""


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


def micro_step_seed(seed: int, rank: int, micro_step: int) -> int:
    """The RNG seed of one micro-step on one rank: ranks draw differently, and a resumed run
    draws what an uninterrupted one would (no RNG state to save per rank)."""
    return int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1)[0])


def _all_ranks(flag: bool, group=None) -> bool:
    """True only if `flag` holds on every rank (a MIN all-reduce over the host `group`, see
    `parallel.host_group`; identity in one process)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


class Waited:
    """An iterator that keeps the seconds spent waiting in `next` (`seconds`): the time the
    loop waits for its next batch, i.e. the share of a step the data path did not hide
    (logged as `train/data_wait_frac`; with several ranks it includes their agreement on
    the epoch's end, one small all-reduce)."""

    def __init__(self, iterable):
        self._it, self.seconds = iter(iterable), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.seconds += time.perf_counter() - t


def _batches_forever(session: Session, state: ckpt.TrainState, group=None) -> Iterator[dict]:
    """Batches epoch after epoch, in lockstep over ranks: when any rank's shard runs out
    (shards may differ by a batch: skipped samples, uneven splits), every rank ends the
    epoch together, so no rank waits in a collective for a rank that is between epochs.

    After a resume the first `state.batches_in_epoch` batches of the epoch are read and
    dropped (decoding them is the cost of an exact resume); rank 0 checks that the last
    dropped one is the checkpoint's last batch and says so if not."""
    skip, expected = state.batches_in_epoch, list(state.last_keys)
    while True:
        stream, got_any = iter(session.batches(state.epoch)), False
        while True:
            batch = next((b for b in stream if b["video"].shape[0] > 0), None)
            if not _all_ranks(batch is not None, group):
                break
            got_any = True
            if skip:
                skip -= 1
                if not skip and session.rank == 0 and expected and batch["keys"] != expected:
                    print(
                        f"[vqtok] warning: the resumed data position differs from the "
                        f"checkpoint's (epoch {state.epoch}, batch {state.batches_in_epoch}): "
                        "the run goes on, but not as an uninterrupted one would",
                        file=sys.stderr,
                    )
                continue
            state.batches_in_epoch += 1
            state.last_keys = batch["keys"]
            yield batch
        if skip:
            print(
                f"[vqtok] warning: epoch {state.epoch} ended {skip} batches before the "
                "checkpoint's position",
                file=sys.stderr,
            )
            skip = 0
        state.epoch += 1
        state.batches_in_epoch = 0
        if not _all_ranks(got_any, group):
            raise RuntimeError(
                "the training data yielded no usable sample in a whole epoch "
                "on some rank; run `vqtok inspect` on the shards"
            )


def warmup_ema(model: nn.Module, decay: float) -> AveragedModel:
    """EMA of `model`'s weights and buffers whose decay warms up with the update count n:
    min(decay, (1 + n) / (10 + n)), as TensorFlow's `ExponentialMovingAverage(num_updates=)`,
    so a short run's EMA never keeps a share of the random initialisation (a plain 0.99 keeps
    0.99^120 = 30 % of it after 120 steps; warmed up, 0.2 %).

    n is `AveragedModel.n_averaged`, saved with the EMA, so a resumed run goes on where it
    was. It is kept on the CPU: `update_parameters` tests it on the host at every update, and
    the decay is computed from it there (a GPU copy would be a sync once a step)."""
    ema = AveragedModel(model, use_buffers=True)

    @torch.no_grad()
    def update(ema_params: list, params: list, _n_on_device) -> None:
        n = float(ema.n_averaged)
        d = min(decay, (1 + n) / (10 + n))
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1 - d)
        else:  # integer buffers (counters): copied
            torch._foreach_copy_(ema_params, params)

    ema.multi_avg_fn = update
    ema.n_averaged = ema.n_averaged.cpu()
    return ema


def train_loop(cfg: Config, session: Session) -> dict[str, float]:
    """Train for cfg.train.steps optimiser steps; returns the last metrics."""
    device = setup_accelerator(cfg.scaling.use_gpu)
    init_single_process_group(device)  # no-op under Ray Train, which made the group
    flags = host_group()  # the data lockstep's all-reduces stay on the host
    seed_everything(cfg.train.seed)
    objective = build_objective(cfg, device)
    # the EMA copies the full model before ZeRO-3 partitions it (engines are made after)
    ema = warmup_ema(objective.model, cfg.train.ema_decay)
    objective.init_engines()
    state = ckpt.TrainState(seed=cfg.train.seed)
    restore = session.restore_dir()
    if restore is not None:
        state = ckpt.check_loadable(restore, session.world_size)["state"]
        objective.load(restore)
        ckpt.load_ema(restore, ema)
        if session.rank == 0:
            print(f"[vqtok] resumed from {restore} at step {state.step}", flush=True)
    saved_step = state.step if restore is not None else None  # no second folder of a step

    log_every, t0, seen0 = cfg.train.log_every, time.perf_counter(), state.samples_seen
    tokens0 = 0
    run_start, first_step = t0, state.step
    metrics: dict[str, float] = {}
    # loss terms summed on the device since the last log: read back only when logged
    window: dict[str, torch.Tensor | float] = {}
    window_n = 0
    batches = Waited(_batches_forever(session, state, flags))
    wait0 = 0.0
    for batch in batches:
        if state.step >= cfg.train.steps:
            break
        # every rank draws differently, and a resumed run as an uninterrupted one would
        seed_everything(micro_step_seed(cfg.train.seed, session.rank, state.micro_step))
        x = to_model_input(batch["video"], device)
        terms, stepped = objective.micro_step(x, state.step, batch.get("num_frames"))
        state.micro_step += 1
        state.samples_seen += x.shape[0] * session.world_size
        if terms is None:  # skipped on every rank; the weights are as they were
            state.nonfinite_steps += 1
            state.nonfinite_streak += 1
            if state.nonfinite_streak == 1 and session.rank == 0:
                _say(f"non-finite loss at micro-step {state.micro_step - 1} (after step "
                     f"{state.step}): skipped, {state.nonfinite_steps} so far")  # fmt: skip
            limit = cfg.train.max_nonfinite_steps
            if limit and state.nonfinite_streak >= limit:
                stop_nonfinite(cfg, session, objective, ema, state, metrics, saved_step)
            continue
        state.nonfinite_streak = 0
        for k, v in terms.items():
            v = v.detach().float() if torch.is_tensor(v) else v
            window[k] = window[k] + v if k in window else v
        window_n += 1
        if not stepped:
            continue
        state.step += 1
        with gathered(objective.model, cfg.train.zero_stage):
            ema.update_parameters(objective.model)
        last = state.step >= cfg.train.steps
        if state.step % log_every == 0 or last:
            elapsed = time.perf_counter() - t0
            metrics = {f"train/{k}": float(v) / window_n for k, v in window.items()}
            window, window_n = {}, 0
            clips = state.samples_seen - seen0
            metrics.update(
                {
                    "train/lr": objective.lr(),
                    "train/clips_per_s": clips / elapsed,
                    "train/tokens_per_s": (objective.tokens - tokens0)
                    * session.world_size
                    / elapsed,
                    "train/epoch": state.epoch,
                    "train/data_wait_frac": (batches.seconds - wait0) / elapsed,
                    "train/nonfinite_steps": state.nonfinite_steps,
                    "train/nonfinite_disc_steps": objective.nonfinite_disc,
                    **objective.quantizer_metrics(),
                    **session.data_metrics(),
                }
            )
            if session.rank == 0:
                per_step = (time.perf_counter() - run_start) / max(1, state.step - first_step)
                _progress(state.step, cfg.train.steps, metrics, per_step)
            t0, seen0, tokens0 = time.perf_counter(), state.samples_seen, objective.tokens
            wait0 = batches.seconds
        path = None
        if state.step % cfg.train.ckpt_every == 0 or last:  # before eval: an eval that fails
            path = save_checkpoint(cfg, session, objective, ema, state)  # cannot lose it
            saved_step = state.step
        evaluate_now = last or (cfg.train.eval_every and state.step % cfg.train.eval_every == 0)
        if evaluate_now and session.rank == 0:
            metrics.update(run_eval(cfg, session, ema.module, objective, device, state.step))
        if last and session.rank == 0:  # before the last report: a Tune scheduler (ASHA at
            session.export_model(ema.module)  # max_t) may stop the trial right at it
        if metrics and (state.step % log_every == 0 or path is not None or evaluate_now):
            session.report({**metrics, "step": state.step}, path)
    return metrics


def stop_nonfinite(cfg, session, objective, ema, state, metrics, saved_step) -> None:
    """`train.max_nonfinite_steps` bad micro-steps in a row: checkpoint the weights of the
    last good step (unchanged since, as every bad step was skipped) unless that step has a
    checkpoint already, report, and raise. Every rank gets here at the same micro-step (the
    finiteness check is all-reduced), so the checkpoint is a collective one."""
    n, first = state.nonfinite_streak, state.micro_step - state.nonfinite_streak
    path = None
    if saved_step != state.step:
        path = save_checkpoint(cfg, session, objective, ema, state)
    where = ckpt.step_dir(cfg.run.run_dir, state.step)
    session.report(
        {**metrics, "step": state.step, "train/nonfinite_steps": state.nonfinite_steps,
         "train/stopped_nonfinite": n, "train/first_nonfinite_micro_step": first},
        path,
    )  # fmt: skip
    raise NonFiniteLossError(nonfinite_message(n, first, state.step, where))


def nonfinite_message(n: int, first_micro: int, step: int, where: Path) -> str:
    return (
        f"training stopped: {n} non-finite losses in a row (micro-steps {first_micro} to "
        f"{first_micro + n - 1}, after optimiser step {step}; train.max_nonfinite_steps={n}). "
        f"Every one was skipped: {where} holds the weights of step {step}, from before the "
        "first of them. Lower optim.lr or check the data, then resume."
    )


def save_checkpoint(cfg: Config, session: Session, objective, ema, state) -> Path:
    """Every rank writes its engine shards into a staging folder and then its manifest;
    rank 0 also the EMA, train state, config and codebooks, and COMPLETE last."""
    staging = Path(tempfile.mkdtemp(prefix="vqtok-ckpt-")) / ckpt.step_dir(Path(), state.step).name
    staging.mkdir(parents=True)
    objective.save(staging)
    if session.rank == 0:
        ckpt.write_rank0_files(staging, state, ema, cfg.to_dict())
        for i, q in enumerate(top_level_quantizers(ema.module)):
            q.export_codebook(staging / "codebooks" / f"quantizer{i}")
    ckpt.write_manifest(staging, session.rank)
    if session.rank == 0:
        ckpt.mark_complete(staging, session.world_size)
    return staging


def run_eval(cfg: Config, session: Session, model, objective, device, step: int) -> dict:
    """Rank 0: metrics of the EMA weights on the validation batches, and a recon grid."""
    batches = session.eval_batches()
    if batches is None:
        return {}
    metrics, media = evaluate(
        model, batches, device, video=objective.video,
        max_batches=cfg.train.eval_batches, autocast=autocast(device, use_bf16(cfg, device)),
    )  # fmt: skip
    if "grid" in media:
        session.log_image(media["grid"], step)
    return metrics


def _say(text: str) -> None:
    _stderr(f"[vqtok] {text}\n")


def _stderr(line: str) -> None:
    """To the raw descriptor: Ray Train V2 tees Python-level streams, which printed each
    line twice. Where stderr has no descriptor (a notebook, a captured test), to the stream."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        sys.stderr.write(line)
        return
    os.write(fd, line.encode())


def _progress(step: int, total: int, m: dict, seconds_per_step: float) -> None:
    eta = (total - step) * seconds_per_step
    recon = next((f"  recon {v:.4f}" for k, v in m.items() if k.startswith("train/recon_")), "")
    # one total, or one per part where a step optimises several (HFSVQ: train/low/total, …)
    parts = {k[len("train/"):-len("/total")]: v for k, v in m.items()
             if k.startswith("train/") and k.endswith("/total")}  # fmt: skip
    loss = (f"loss {m.get('train/total', math.nan):.4f}" if "train/total" in m or not parts
            else "loss " + " ".join(f"{k} {v:.4f}" for k, v in sorted(parts.items())))
    line = (
        f"[vqtok] step {step}/{total}  {loss}{recon}  "
        f"{m.get('train/clips_per_s', 0.0):.2f} clips/s  "
        f"data wait {100 * m.get('train/data_wait_frac', 0.0):.0f}%  ETA {eta:.0f}s\n"
    )
    _stderr(line)
