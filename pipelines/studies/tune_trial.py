"""What runs inside one Tune trial: a driver function that fits a `TorchTrainer` (the Ray
Train V2 + Tune pattern; `Tuner(trainer)` is deprecated), reporting to Tune through a
callback. Imported only on the cluster and by `pipelines.studies.tune`, so `vqtok --help` stays
free of Ray Tune."""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.config import save_config
from pipelines.studies.tune_space import resolve


class MetricReport(TuneReportCallback):
    """Forward to Tune only the reports that carry the study's metric.

    The loop reports train/* every `log_every` and eval/* only at evals; Tune rejects a
    result without its metric, and ASHA and Optuna read it from every result. Rank 0's
    metrics are the ones forwarded (it alone evaluates)."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(values: dict[str, Any], base: dict, study: dict) -> None:
    """One trial: `base` (raw training config) + the sampled dotted `values` + the study's
    run settings (`study["run"]`: storage, tracking URI, parent run id); the trial id names
    the run folder and the MLflow child run."""
    from ray import tune

    from pipelines.training.launch import make_trainer

    trial_id = tune.get_context().get_trial_id()
    # No worker-group restarts inside a trial: Tune retries the whole trial instead (the
    # study's FailureConfig has scaling.max_failures), and the trial resumes from its own
    # checkpoint. When Tune stops a trial its Train workers can die before the controller;
    # a controller allowed to restart then makes a new placement group and is killed before
    # Train's cleaner learns of it, which keeps the group's CPUs until the study's job ends
    # (seen in tests/test_tune.py's Ray logs).
    cfg = resolve(base, {**values, **study["run"], "run.name": trial_id, "scaling.max_failures": 0})
    save_config(cfg, cfg.run.run_dir / "config.yaml")
    make_trainer(cfg, callbacks=[MetricReport(study["metric"])]).fit()
