"""Where the training loop runs: `LocalSession` (one process, the plain data iterator) and
`RaySession` (a Ray Train worker: its dataset shard, `ray.train.report`, the merged
checkpoint), over one `Session` base; `RunLog` is rank 0's MLflow record of the run."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from pipelines.config import Config, from_dict
from pipelines.store import checkpoint as ckpt


class RunLog:
    """Rank 0's record of a run: MLflow (through `Tracker`, which never raises because the
    store failed) plus the run folder's own journal."""

    def __init__(self, cfg: Config, rank: int):
        self.tracker, self._system = None, None
        if rank != 0:
            return
        from pipelines.tracking.tracker import Tracker

        self.tracker = Tracker(cfg.run.run_dir, cfg.run.tracking_uri, cfg.run.experiment)
        self.tracker.start(cfg.run.name, params=cfg.to_dict(), tags={"vqtok.kind": "train"},
                           parent_run_id=cfg.run.parent_run_id)  # fmt: skip
        self._system = self._system_metrics() if cfg.run.system_metrics else None

    def _system_metrics(self):
        """MLflow's system-metrics monitor on this node (`system/…` metrics every 10 s), or
        None when the store was not reached at start (metrics then stay journal-only)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if self.tracker.run_id is None:
            print("[vqtok] warning: run.system_metrics: MLflow not reachable at start; off",
                  file=sys.stderr)  # fmt: skip
            return None
        monitor = SystemMetricsMonitor(self.tracker.run_id,
                                       tracking_uri=self.tracker.tracking_uri)  # fmt: skip
        monitor.start()
        return monitor

    def metrics(self, metrics: dict, checkpoint: Path | None) -> None:
        if self.tracker is None:
            return
        step = int(metrics.get("step", 0))
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        evaluation = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if evaluation:
            self.tracker.log_dict({"step": step, **evaluation}, f"eval/step_{step:08d}.json")
            if "eval/psnr" in evaluation:
                self._psnr_plot(evaluation)
        if checkpoint is not None:
            for d in sorted((checkpoint / "codebooks").glob("quantizer*")):
                self.tracker.log_codebook(d, step=step, name=f"codebooks/{d.name}")

    def _psnr_plot(self, evaluation: dict) -> None:
        """`plots/psnr.png`: validation PSNR over the run's steps (its journal, so a resumed
        run keeps its history) beside bicubic at the model's rate and the mean colour."""
        from pipelines.tracking.media import curve_plot

        refs = {name: evaluation[key] for name, key in (
            ("bicubic at its rate", "eval/reference_rate_psnr"),
            ("mean colour", "eval/reference_mean_colour_psnr")) if key in evaluation}  # fmt: skip
        try:
            rows = (json.loads(x) for x in (self.tracker.run_dir / "metrics.jsonl").open())
            points = sorted({r["step"]: r["metrics"]["eval/psnr"] for r in rows
                             if "eval/psnr" in r.get("metrics", {})}.items())  # fmt: skip
            path = curve_plot(points, self.tracker.run_dir / "plots" / "psnr.png", refs,
                              title="validation PSNR")  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a plot never stops training
            print(f"[vqtok] warning: PSNR plot failed: {exc!r}", file=sys.stderr)
            return
        self.tracker.log_artifact(path, "plots")

    def image(self, image, step: int) -> None:
        if self.tracker is not None:
            self.tracker.log_image(image, "recon", step)

    def export_model(self, cfg: Config, model) -> Path:
        """`<run>/model/`: the EMA weights and model config as an MLflow pyfunc model
        (`pipelines.store.models`), logged as the run's logged model (`models:/<model_id>`,
        the run's tag `vqtok.model_id`) and artifact `model/` (`runs:/<id>/model`): either
        URI loads it (`vqtok tokenize --model …`)."""
        from pipelines.store.models import export_model

        run_id = self.tracker.run_id if self.tracker is not None else None
        identity = {"run_id": run_id} if run_id else {}
        out = export_model(model, cfg.model.to_spec(), cfg.run.run_dir / "model", identity,
                           cfg.to_dict()["data"])  # fmt: skip
        if self.tracker is not None:
            self.tracker.log_model(out, "tokenizer", "model", step=cfg.train.steps)
        return out

    def end(self, status: str) -> None:
        if self.tracker is not None:
            if self._system is not None:
                self._system.finish()
            self.tracker.end(status)


def eval_stream(cfg: Config):
    """The validation batches: `train.eval_shards` (else the training shards), epoch 0."""
    from pipelines.data.stream import iter_batches

    shards = cfg.train.eval_shards or cfg.data.shards
    data = from_dict(type(cfg.data), {**cfg.to_dict()["data"], "shards": list(shards)}, "data")
    return iter_batches(data, epoch=0)


class Session:
    """Where the training loop runs (`pipelines.training.loop.train_loop` calls only these):
    batches, restore_dir and report differ by place; the rest is shared."""

    rank, world_size = 0, 1

    def __init__(self, cfg: Config, rank: int = 0):
        self.cfg, self._stream = cfg, None
        self.log = RunLog(cfg, rank)

    def data_metrics(self) -> dict[str, float]:
        return self._stream.metrics() if self._stream is not None else {}

    def eval_batches(self):
        """Rank 0 evaluates; other ranks get None."""
        return eval_stream(self.cfg) if self.rank == 0 else None

    def log_image(self, image, step: int) -> None:
        self.log.image(image, step)

    def export_model(self, model) -> None:
        self.log.export_model(self.cfg, model)


class LocalSession(Session):
    """One process, no Ray: the plain data iterator; checkpoints renamed into the run folder."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.run_dir = cfg.run.run_dir

    def batches(self, epoch: int):
        from pipelines.data.stream import iter_batches

        self._stream = iter_batches(self.cfg.data, epoch=self.cfg.data.epoch + epoch)
        return self._stream

    def restore_dir(self) -> Path | None:
        # `launch.check_run_folder` has already verified every newer folder and set the bad
        # ones aside (`resume.newest_sound`); the loop verifies this one once more
        # (`check_loadable`): a third full read of every file would add nothing
        return ckpt.latest(self.run_dir)

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            checkpoint = ckpt.publish(checkpoint, self.run_dir, self.cfg.train.keep_last)
        self.log.metrics(metrics, checkpoint)


class RaySession(Session):
    """Inside a Ray Train worker: dataset shard, `ray.train.report`, `get_checkpoint`."""

    def __init__(self, cfg: Config):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        super().__init__(cfg, self.rank)
        self._shard = ray.train.get_dataset_shard("train")

    def batches(self, epoch: int):
        from pipelines.data.stream import BatchStream

        self._stream = BatchStream(self._shard)
        return self._stream

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
