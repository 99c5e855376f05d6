"""`vqtok train CONFIG.yaml [key=value ...] [--local]`: the training loop on Ray Train, or in
one process.

Ray path: `TorchTrainer` with one `pipelines.training.loop.train_loop` per worker (gloo on CPU, NCCL on
GPU), the Ray Data pipeline sharded over workers (`get_dataset_shard`), checkpoints reported
with `ray.train.report` into `<run.storage>/<run.name>/step_N`, `FailureConfig` restarts from
the latest one, and a run started again with the same name resumes (Train V2 resumes from
`RunConfig(name, storage_path)`; `run.resume: never` makes reuse an error instead). The
dataset is rebuilt at every (re)start of the worker group, from the data epoch of the newest
checkpoint (`_train_dataset`), so a restarted group reads the epoch it stopped in.
Local path (`--local`): the same loop and checkpoints, plain iterator, no Ray.
Rank 0 logs to MLflow (`pipelines.tracking.tracker`); metrics are also kept in the run folder.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import replace
from pathlib import Path

from pipelines.cluster.connect import init_ray, verbose
from pipelines.config import Config, ConfigError, from_dict, load_config, save_config, validate
from pipelines.store import checkpoint as ckpt
from pipelines.tracking.progress import one_line_warnings
from pipelines.training.loop import NonFiniteLossError, nonfinite_message, train_loop
from pipelines.training.resume import newest_sound, reconcile, resume_checkpoint
from pipelines.training.sessions import LocalSession, RaySession


def _quiet_worker() -> None:
    """Loggers that speak on every worker and say nothing to a user (`--verbose` keeps
    them): torch's "No CUDA runtime is found" on CPU workers (when DeepSpeed imports its
    extension loader); DeepSpeed's "… built successfully", a `print` per engine that Ray
    Train turns into a root-logger record; Ray 2.60's per-report INFO line (the whole metrics
    dict, every report, every rank), from a logger named by its file path that
    `LoggingConfig` does not reach. vqtok's own warnings (e.g. "LPIPS is OFF") print as one
    `[vqtok] warning:` line instead of Python's file:line header and source line."""
    import logging

    import torch

    if verbose():
        return
    one_line_warnings()
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger().addFilter(lambda r: "built successfully" not in str(r.msg))
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(config: dict) -> None:
    """Ray Train's per-worker function; the config is passed explicitly, never global."""
    _quiet_worker()
    cfg = from_dict(Config, config, "")
    session = RaySession(cfg)
    status = "FAILED"
    try:
        train_loop(cfg, session)
        status = "FINISHED"
    except NonFiniteLossError as exc:
        # reported with its checkpoint; returning keeps Ray from restarting a run that would
        # diverge again (every rank stops at the same micro-step); the driver raises it
        if session.rank == 0:
            print(f"[vqtok] {exc}", file=sys.stderr)
    finally:
        session.log.end(status)


# --- the launcher (driver side) ---------------------------------------------------------


def check_run_folder(cfg: Config, local: bool) -> Path | None:
    """Make reuse of a run name a visible choice: resume (default) or fail. Returns the
    checkpoint the run resumes from, chosen as the workers will choose it
    (`pipelines.training.resume`)."""
    if ckpt.latest(cfg.run.run_dir) is None:
        return None
    if cfg.run.resume == "never":
        raise ConfigError(
            f"run.name: {cfg.run.name!r} already has checkpoints in "
            f"{cfg.run.run_dir} and run.resume is 'never'"
        )
    found = newest_sound(cfg.run.run_dir) if local else reconcile(cfg.run.run_dir)
    if found is not None:
        print(f"[vqtok] run '{cfg.run.name}' exists: resuming from {found}", file=sys.stderr)
    return found


def check_data(cfg: Config) -> None:
    """Local shard paths must name readable tars before any worker starts (remote URIs are
    checked by the readers, which count a bad shard and go on)."""
    from pipelines.data.batches import readable_shards

    for key, shards in (
        ("data.shards", cfg.data.shards),
        ("train.eval_shards", cfg.train.eval_shards),
    ):
        if key == "data.shards" and not shards:
            raise ConfigError("data.shards: no training shards given")
        local = tuple(p for p in shards if "://" not in p)
        if local:
            try:
                readable_shards(replace(cfg.data, shards=local))
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from exc


def absolute_shards(cfg: Config) -> None:
    """Relative local shard paths are taken from the caller's folder, not a worker's."""

    def fix(paths: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(p if "://" in p else str(Path(p).expanduser().absolute()) for p in paths)

    cfg.data.shards = fix(cfg.data.shards)
    cfg.train.eval_shards = fix(cfg.train.eval_shards)


def fit(cfg: Config, local: bool = False) -> dict:
    """Train (resuming a run of the same name); returns the final metrics."""
    absolute_shards(cfg)
    validate(cfg)
    check_data(cfg)
    check_run_folder(cfg, local)
    save_config(cfg, cfg.run.run_dir / "config.yaml")
    if local:
        _quiet_worker()
        session = LocalSession(cfg)
        status = "FAILED"
        try:
            metrics = train_loop(cfg, session)
            status = "FINISHED"
        finally:
            session.log.end(status)
        return metrics
    return _fit_ray(cfg)


def _fit_ray(cfg: Config) -> dict:
    init_ray()
    result = make_trainer(cfg).fit()
    metrics = dict(result.metrics or {})
    if "train/stopped_nonfinite" in metrics:
        step = int(metrics["step"])
        raise NonFiniteLossError(nonfinite_message(
            int(metrics["train/stopped_nonfinite"]), int(metrics["train/first_nonfinite_micro_step"]),
            step, ckpt.step_dir(cfg.run.run_dir, step),
        ))  # fmt: skip
    return metrics


def _train_dataset(cfg: Config):
    """Ray Train calls this at every start of the worker group (the first, and each restart
    after a failure): the data from the epoch of the checkpoint the group resumes from; the
    loop then drops the batches that epoch already gave (`loop._batches_forever`)."""
    from pipelines.data.ray_dataset import build_dataset

    epoch = 0
    found = resume_checkpoint(cfg.run.run_dir)
    if found is not None:
        try:
            epoch = ckpt.TrainState.from_file(found / "train_state.json").epoch
        except ckpt.CheckpointError:
            pass  # the loop's own check of the checkpoint names the file
    return build_dataset(replace(cfg.data, epoch=cfg.data.epoch + epoch))


def make_trainer(cfg: Config, callbacks: list | None = None):
    """The `TorchTrainer` of a run (also built per trial by `pipelines.studies.tune`)."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    loop_config = cfg.to_dict()
    # resolved here: a worker's working directory is its Ray session's, where a relative
    # storage would put the MLflow store, metrics and model of a run (not its checkpoints)
    loop_config["run"]["storage"] = str(cfg.run.run_dir.parent)
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(cfg.run.run_dir.parent),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
            callbacks=callbacks,
            # Ray Train's INFO lines echo every report's whole metrics dict: our progress
            # line says what matters, and everything stays in the run folder and MLflow
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": functools.partial(_train_dataset, cfg)},
        dataset_config=_ingest_config(),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
    )


def _ingest_config():
    """How Ray Train splits the batches over its workers: in order and by turns, so the same
    seed gives every rank the same batches in every run (an exact resume, identical runs).
    Train replaces the dataset's execution options with the driver's defaults (order not
    kept), and its locality hints hand each worker the first buffered batch whose location
    is already known: the split then changed from run to run (measured: two 12-step runs of
    jobs/debug.yaml with one seed diverged). Locality buys little here: batches are decoded
    on CPU nodes and trained on GPU nodes (cluster/), so they travel either way."""
    import copy

    from ray.data import DataContext
    from ray.train import DataConfig

    # the driver's options, as Train's default takes them (`default_ingest_options` builds a
    # new ExecutionOptions, whose deprecated `exclude_resources` setter warns at every run)
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(execution_options=options, enable_shard_locality=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipelines.config import SECTIONS

    p.description = ("Train a tokenizer: Ray Train workers running DeepSpeed (or one process "
                     "with --local), MLflow tracking, checkpoints under run.storage/run.name.")  # fmt: skip
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "\n".join(
        ["config sections (YAML sections, or key=value overrides such as optim.lr=3e-4):",
         *(f"  {k:8s} {v}" for k, v in SECTIONS.items()),
         "relative paths (shards, run.storage) resolve from the working directory.",
         "example: vqtok train jobs/demo.yaml train.steps=200 optim.lr=1e-3 --local"])  # fmt: skip
    p.add_argument("config", type=Path, help="a jobs/*.yaml file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4")
    p.add_argument("--local", action="store_true", help="one process, no Ray (same loop)")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        metrics = fit(cfg, local=args.local)
    except ConfigError as exc:
        print(f"vqtok train: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"vqtok train: {exc}", file=sys.stderr)
        return 1
    from pipelines.inference.evaluate import reference_table

    print(f"[vqtok] run folder: {cfg.run.run_dir} (every metric: metrics.jsonl, MLflow)")
    if any(k.startswith("eval/") for k in metrics):
        print(reference_table(metrics))
    elif "train/total" in metrics:
        print(f"  train/total = {metrics['train/total']:.4f} (no evaluation: train.eval_every)")
    return 0
