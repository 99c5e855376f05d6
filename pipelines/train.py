"""`vqtok train CONFIG.yaml [key=value ...] [--local]`: the training loop on Ray Train, or in
one process.

Ray path: `TorchTrainer` with one `pipelines.loop.train_loop` per worker (gloo on CPU, NCCL on
GPU), the Ray Data pipeline sharded over workers (`get_dataset_shard`), checkpoints reported
with `ray.train.report` into `<run.storage>/<run.name>/step_N`, `FailureConfig` restarts from
the latest one, and a run started again with the same name resumes (Train V2 resumes from
`RunConfig(name, storage_path)`; `run.resume: never` makes reuse an error instead). The
dataset is rebuilt at every (re)start of the worker group, from the data epoch of the newest
checkpoint (`_train_dataset`), so a restarted group reads the epoch it stopped in.
Local path (`--local`): the same loop and checkpoints, plain iterator, no Ray.
Rank 0 logs to MLflow (`pipelines.tracking`); metrics are also kept in the run folder.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines import checkpoint as ckpt
from pipelines.config import Config, ConfigError, from_dict, load_config, save_config, validate
from pipelines.loop import NonFiniteLossError, nonfinite_message, train_loop


class RunLog:
    """Rank 0's record of a run: MLflow (through `Tracker`, which never raises because the
    store failed) plus the run folder's own journal."""

    def __init__(self, cfg: Config, rank: int):
        self.tracker = None
        if rank != 0:
            return
        from pipelines.tracking import Tracker

        self.tracker = Tracker(cfg.run.run_dir, cfg.run.tracking_uri, cfg.run.experiment)
        self.tracker.start(cfg.run.name, params=cfg.to_dict(), tags={"vqtok.kind": "train"},
                           parent_run_id=cfg.run.parent_run_id)  # fmt: skip

    def metrics(self, metrics: dict, checkpoint: Path | None) -> None:
        if self.tracker is None:
            return
        step = int(metrics.get("step", 0))
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        evaluation = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if evaluation:
            self.tracker.log_dict({"step": step, **evaluation}, f"eval/step_{step:08d}.json")
        if checkpoint is not None:
            for d in sorted((checkpoint / "codebooks").glob("quantizer*")):
                self.tracker.log_codebook(d, step=step, name=f"codebooks/{d.name}")

    def image(self, image, step: int) -> None:
        if self.tracker is not None:
            self.tracker.log_image(image, "recon", step)

    def export_model(self, cfg: Config, model) -> Path:
        """`<run>/model/`: the EMA weights and model config as an MLflow pyfunc model
        (`pipelines.model_store`), logged as the run's artifact `model/` so that
        `runs:/<id>/model` loads it (`vqtok tokenize --model runs:/<id>/model`)."""
        from pipelines.model_store import export_model

        run_id = self.tracker.run_id if self.tracker is not None else None
        identity = {"run_id": run_id} if run_id else {}
        out = export_model(model, cfg.model, cfg.run.run_dir / "model", identity,
                           cfg.to_dict()["data"])  # fmt: skip
        if self.tracker is not None:
            self.tracker.log_artifact(out, "model")
        return out

    def end(self, status: str) -> None:
        if self.tracker is not None:
            self.tracker.end(status)


def _eval_stream(cfg: Config):
    from pipelines.data import iter_batches

    shards = cfg.train.eval_shards or cfg.data.shards
    data = from_dict(type(cfg.data), {**_data_dict(cfg), "shards": list(shards)}, "data")
    return iter_batches(data, epoch=0)


def _data_dict(cfg: Config) -> dict[str, Any]:
    return cfg.to_dict()["data"]


class LocalSession:
    """One process, no Ray: the plain data iterator; checkpoints renamed into the run folder."""

    rank, world_size = 0, 1

    def __init__(self, cfg: Config):
        self.cfg, self.run_dir, self._stream = cfg, cfg.run.run_dir, None
        self.log = RunLog(cfg, 0)

    def batches(self, epoch: int):
        from pipelines.data import iter_batches

        self._stream = iter_batches(self.cfg.data, epoch=self.cfg.data.epoch + epoch)
        return self._stream

    def data_metrics(self) -> dict[str, float]:
        return self._stream.metrics() if self._stream is not None else {}

    def restore_dir(self) -> Path | None:
        return ckpt.latest(self.run_dir)

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            checkpoint = ckpt.publish(checkpoint, self.run_dir, self.cfg.train.keep_last)
        self.log.metrics(metrics, checkpoint)

    def eval_batches(self):
        return _eval_stream(self.cfg)

    def log_image(self, image, step: int) -> None:
        self.log.image(image, step)

    def export_model(self, model) -> None:
        self.log.export_model(self.cfg, model)


class RaySession:
    """Inside a Ray Train worker: dataset shard, `ray.train.report`, `get_checkpoint`."""

    def __init__(self, cfg: Config):
        import ray.train

        ctx = ray.train.get_context()
        self.cfg = cfg
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._shard = ray.train.get_dataset_shard("train")
        self._stream = None
        self.log = RunLog(cfg, self.rank)

    def batches(self, epoch: int):
        from pipelines.data import BatchStream

        self._stream = BatchStream(self._shard)
        return self._stream

    def data_metrics(self) -> dict[str, float]:
        return self._stream.metrics() if self._stream is not None else {}

    def restore_dir(self) -> Path | None:
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None:
            return None
        # the merged checkpoint (every rank's shards): ZeRO-2 needs it, a rank-local one fails.
        # On a local or mounted filesystem it is read in place; otherwise each rank downloads
        # it into its own folder: `to_directory()` without a path gives every rank on a node
        # the same temporary folder, and one rank's copy then overwrote files another was
        # reading (a corrupt `ema.pt` after a worker restart, seen in CI).
        import pyarrow.fs

        if isinstance(found.filesystem, pyarrow.fs.LocalFileSystem) and Path(found.path).is_dir():
            return Path(found.path)
        target = tempfile.mkdtemp(prefix=f"vqtok-restore-rank{self.rank}-")
        return Path(found.to_directory(target))

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        import ray.train

        self.log.metrics(metrics, checkpoint)
        if checkpoint is None:
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
            checkpoint_dir_name=checkpoint.name,
        )

    def eval_batches(self):
        return _eval_stream(self.cfg) if self.rank == 0 else None

    def log_image(self, image, step: int) -> None:
        self.log.image(image, step)

    def export_model(self, model) -> None:
        self.log.export_model(self.cfg, model)


def _quiet_report_log() -> None:
    """Ray 2.60's per-report INFO line (the whole metrics dict, every report, every rank)
    comes from a logger named by its file path, which `LoggingConfig` does not reach."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(config: dict) -> None:
    """Ray Train's per-worker function; the config is passed explicitly, never global."""
    _quiet_report_log()
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


def check_run_folder(cfg: Config) -> Path | None:
    """Make reuse of a run name a visible choice: resume (default) or fail."""
    found = ckpt.latest(cfg.run.run_dir)
    if found is not None and cfg.run.resume == "never":
        raise ConfigError(
            f"run.name: {cfg.run.name!r} already has checkpoints in "
            f"{cfg.run.run_dir} and run.resume is 'never'"
        )
    if found is not None:
        print(f"[vqtok] run '{cfg.run.name}' exists: resuming from {found}", file=sys.stderr)
    return found


def check_data(cfg: Config) -> None:
    """Local shard paths must name readable tars before any worker starts (remote URIs are
    checked by the readers, which count a bad shard and go on)."""
    from pipelines.data import readable_shards

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
    check_run_folder(cfg)
    save_config(cfg, cfg.run.run_dir / "config.yaml")
    if local:
        session = LocalSession(cfg)
        status = "FAILED"
        try:
            metrics = train_loop(cfg, session)
            status = "FINISHED"
        finally:
            session.log.end(status)
        return metrics
    return _fit_ray(cfg)


def init_ray(**kwargs) -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`; `auto` = the cluster
    `ray start` made on this machine), else start a private local Ray (never an unrelated
    Ray that happens to run here); forwards the few environment variables workers need."""
    import socket

    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        # Train V2's PlacementGroupCleaner asks the state API (the dashboard) whether a run's
        # controller is alive, to free its CPUs when it dies (a failed run, a trial ASHA
        # stops). Without a dashboard, or with another Ray on the host ("Found multiple
        # active Ray instances"), it cannot, and stopped runs keep their CPUs reserved. So a
        # local Ray gets its dashboard on a free port, named to every worker.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs = {"include_dashboard": True, "dashboard_host": "127.0.0.1",
                  "dashboard_port": port, **kwargs}  # fmt: skip
    # Each report blocks until the controller polls; 2 s by default (RUNTIME.md).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # per-epoch progress bars of Ray Data would bury the training progress line
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    env = {"env_vars": {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}}
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", runtime_env=env, **kwargs)


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
    from pipelines.data import build_dataset

    epoch = 0
    found = resume_checkpoint(cfg.run.run_dir)
    if found is not None:
        try:
            epoch = ckpt.TrainState.from_file(found / "train_state.json").epoch
        except ckpt.CheckpointError:
            pass  # the loop's own check of the checkpoint names the file
    return build_dataset(replace(cfg.data, epoch=cfg.data.epoch + epoch))


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of its checkpoints


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a (re)started worker group resumes from: the one Ray registered last,
    not merely the newest folder (a worker lost after its files were copied but before Ray
    registered the report leaves a complete folder that Ray will not restore). Ray keeps
    that record in its snapshot file; without the file Ray restores nothing."""
    snap = run_dir / RAY_SNAPSHOT
    if not snap.is_file():
        return None
    try:
        latest = json.loads(snap.read_text())["latest_checkpoint_result"]
        return None if latest is None else run_dir / latest["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:  # another Ray's format
        print(f"[vqtok] warning: cannot read {snap} ({exc!r}); using the newest checkpoint",
              file=sys.stderr)  # fmt: skip
        return ckpt.latest(run_dir)


def make_trainer(cfg: Config, callbacks: list | None = None):
    """The `TorchTrainer` of a run (also built per trial by `pipelines.tune`)."""
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
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
    )


# forwarded to workers: accelerator choice, extension cache, MLflow endpoint
_WORKER_ENV = (
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "MLFLOW_TRACKING_URI",
    "TORCH_HOME",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "RAY_DATA_DISABLE_PROGRESS_BARS",
    "RAY_API_SERVER_ADDRESS",
    "OMP_NUM_THREADS",
)


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
    print(f"[vqtok] run folder: {cfg.run.run_dir}")
    for k in sorted(metrics):
        if k.startswith(("eval/", "train/total")):
            print(f"  {k} = {metrics[k]}")
    return 0
