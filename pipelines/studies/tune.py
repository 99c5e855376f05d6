"""`vqtok tune STUDY.yaml [key=value ...]`: a Ray Tune search over a training config.

STUDY.yaml is a training config (as for `vqtok train`) plus a `tune:` section
(`pipelines.studies.tune_space` has the fields and the domains):

    tune:
      metric: eval/psnr          # eval/* comes at train.eval_every and at the end
      mode: max
      num_samples: 8
      max_concurrent_trials: 2   # null: as many as the cluster's CPUs fit (rule below)
      scheduler: {type: asha, grace_period: 50, reduction_factor: 2}   # or {type: fifo}
      search: random             # or optuna (pip install optuna)
      seed: 0
      space:
        model.quantizer.codebook_size: {choice: [16, 32, 64]}
        optim.lr: {loguniform: [3.0e-4, 3.0e-3]}

Overrides: `tune.*` go to the section (`tune.num_samples=2`, `tune.space.optim.lr={uniform:
[1.0e-4, 1.0e-3]}`), the others to the training config, as for `vqtok train`.

The study folder is `<run.storage>/<run.name>` (an existing one is an error):
    study.yaml            the base config and tune section, resolved
    mlflow/               the study's MLflow store (unless run.tracking_uri or MLFLOW_TRACKING_URI)
    tune/                 Ray Tune's experiment state
    trials/<trial_id>/    each trial's vqtok run folder (config, checkpoints, metrics.jsonl)
    trials.csv, trials.json, best_config.yaml (runnable with `vqtok train`)

Resources: a trial's driver holds 0.01 CPU, its Train workers `scaling.cpus_per_worker` each,
and its Ray Data decode tasks `data.num_cpus` each. Trials fit the cluster when
    max_concurrent_trials x (num_workers x cpus_per_worker + data.num_cpus) <= cluster CPUs
(and max_concurrent_trials x num_workers <= GPUs with use_gpu): the data term leaves one decode
task per trial room to run, or the trial starves (docs/RUNTIME.md). On a cluster, run.storage must
be storage every node shares, and every node must reach the MLflow store (a server URI).

MLflow: one parent run per study (params: the base config and the search space JSON), each
trial a child run (tag mlflow.parentRunId) in the same store and experiment. Every trial that
reaches `train.steps` exports its model before its last report (a scheduler may stop it at
that report) and ends FINISHED; a trial the scheduler stopped earlier has its journal synced
and its run marked KILLED. At the end the parent gets the table and the best config as
artifacts, the best trial's eval metrics as `best/...`, its model's URI as the tag
`vqtok.best_model` (`runs:/<trial run>/model`, printed), and with `tune.register_as` that
model registered under that name.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import (
    Config,
    ConfigError,
    from_dict,
    parse_override,
    read_sections,
    set_dotted,
)
from pipelines.studies.tune_space import TuneConfig, build_space, check_space, resolve, space_json


def load_study(path: str | Path, overrides: list[str] = ()) -> tuple[Config, TuneConfig, dict]:
    """(the base training config, the tune section, the raw training YAML data)."""
    path = Path(path)
    raw = read_sections(path)
    tune_raw = raw.pop("tune", None)
    if not isinstance(tune_raw, dict):
        raise ConfigError(f"tune: {path} needs a `tune:` mapping (metric, mode, space, ...)")
    tune_raw.setdefault("space", {})
    for item in overrides:
        key, value = parse_override(item)
        if key.startswith("tune.space."):  # space keys are dotted themselves: no nesting
            tune_raw["space"][key.removeprefix("tune.space.")] = value
        elif key.startswith("tune."):
            set_dotted(tune_raw, key.removeprefix("tune."), value)
        else:
            set_dotted(raw, key, value)
    tc = from_dict(TuneConfig, tune_raw, "tune")
    cfg = resolve(raw, {})
    tc.validate(cfg)
    check_space(tc, raw)
    return cfg, tc, raw


def run_study(cfg: Config, tc: TuneConfig, base: dict) -> dict[str, Any]:
    """Run every trial; write and log the table and the best config. Returns the summary."""
    from pipelines.cluster.connect import init_ray
    from pipelines.tracking.tracker import Tracker
    from pipelines.training.launch import check_data

    study_dir = cfg.run.run_dir
    if (study_dir / "study.yaml").exists():
        raise ConfigError(f"run.name: a study {cfg.run.name!r} already exists in {study_dir}; "
                          "choose another run.name (resuming a study is not supported)")  # fmt: skip
    check_data(cfg)
    init_ray()
    concurrency = _concurrency(cfg, tc)
    study_dir.mkdir(parents=True, exist_ok=True)
    tune_dict = dataclasses.asdict(tc)
    (study_dir / "study.yaml").write_text(
        yaml.safe_dump({**cfg.to_dict(), "tune": tune_dict}, sort_keys=False)
    )
    tracker = Tracker(study_dir, cfg.run.tracking_uri, cfg.run.experiment)
    params = {**cfg.to_dict(), "tune": {**tune_dict, "space": space_json(tc.space)}}
    parent = tracker.start(cfg.run.name, params=params, tags={"vqtok.kind": "tune"})
    if parent is None:
        tracker.end("FAILED")
        raise ConfigError(f"run.tracking_uri: cannot reach the MLflow store "
                          f"{tracker.tracking_uri} to open the study's parent run")  # fmt: skip
    tracker.log_dict(tc.space, "search_space.json")
    status = "FAILED"
    try:
        study = {"metric": tc.metric, "run": {
            "run.storage": str(study_dir / "trials"), "run.tracking_uri": tracker.tracking_uri,
            "run.parent_run_id": parent}}  # fmt: skip
        grid = _tuner(cfg, tc, base, study, concurrency).fit()
        rows = trial_rows(grid, tc, cfg.train.steps)
        _close_child_runs(rows, study_dir / "trials", tracker.tracking_uri)
        summary = _write_results(cfg, tc, base, rows, tracker)
        status = "FINISHED" if summary["best"] else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
    summary["tracking_uri"] = tracker.tracking_uri
    return summary


def _tuner(cfg: Config, tc: TuneConfig, base: dict, study: dict, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipelines.cluster.connect import verbose
    from pipelines.studies.tune_lines import TrialLines
    from pipelines.studies.tune_trial import run_trial

    # Trials run in the job's working directory (relative shard paths), as `vqtok train` does.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if not verbose():  # Tune's new output engine prints its experiment box even at verbose=0;
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the old one at 0 prints nothing
    s = tc.scheduler
    scheduler = FIFOScheduler()
    if s.type == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=cfg.train.steps,
            grace_period=s.grace_period, reduction_factor=s.reduction_factor)  # fmt: skip
    if tc.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search, limit = OptunaSearch(seed=tc.seed), concurrency
    else:  # Tune ignores max_concurrent_trials for a SearchGenerator: it limits itself
        search = BasicVariantGenerator(random_state=tc.seed, max_concurrent=concurrency)
        limit = None
    driver = tune.with_parameters(run_trial, base=base, study=study)
    return tune.Tuner(
        tune.with_resources(driver, {"cpu": 0.01}),  # the workers hold the CPUs
        param_space=build_space(tc.space),
        tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, num_samples=tc.num_samples,
            max_concurrent_trials=limit, scheduler=scheduler, search_alg=search,
            trial_dirname_creator=_trial_id),
        # a failed trial is retried whole, from its checkpoint (see `run_trial`); vqtok's
        # line per trial event instead of Tune's status tables, unless --verbose
        run_config=tune.RunConfig(name="tune", storage_path=str(cfg.run.run_dir),
            failure_config=tune.FailureConfig(max_failures=cfg.scaling.max_failures),
            verbose=None if verbose() else 0,
            callbacks=[TrialLines(tc.metric, list(tc.space), cfg.train.steps)]),
    )  # fmt: skip


def _trial_id(trial) -> str:
    return trial.trial_id


def _concurrency(cfg: Config, tc: TuneConfig) -> int:
    """max_concurrent_trials, or as many trials as the cluster's CPUs (and GPUs) fit."""
    import ray

    s = cfg.scaling
    per_trial = s.num_workers * s.cpus_per_worker + cfg.data.num_cpus
    have = ray.cluster_resources()
    fit = int(have.get("CPU", 0) // per_trial + 1e-9)
    if s.use_gpu:
        fit = min(fit, int(have.get("GPU", 0) // s.num_workers))
    if tc.max_concurrent_trials is None:
        return max(1, fit)
    if tc.max_concurrent_trials > fit:
        print(f"[vqtok] tune.max_concurrent_trials={tc.max_concurrent_trials}, but the cluster "
              f"fits {fit} trial(s) of {per_trial:g} CPUs now; the rest wait for resources",
              file=sys.stderr)  # fmt: skip
    return tc.max_concurrent_trials


def trial_rows(grid, tc: TuneConfig, steps: int) -> list[dict[str, Any]]:
    """One row per trial, best first: id, status, last step, sampled values, last value of
    the metric. Status: FINISHED (all steps), STOPPED (by the scheduler), ERROR, NO_RESULT."""
    rows = []
    for result in grid:
        hist = result.metrics_dataframe
        value, step = None, 0
        if hist is not None and tc.metric in hist:
            seen = hist[tc.metric].dropna()
            value = float(seen.iloc[-1]) if len(seen) else None
            step = int(hist["step"].max()) if "step" in hist else 0
        if result.error is not None:
            status = "ERROR"
        elif value is None:
            status = "NO_RESULT"
        else:
            status = "FINISHED" if step >= steps else "STOPPED"
        row = {"trial_id": Path(result.path).name, "status": status, "step": step}
        row.update({k: (result.config or {}).get(k) for k in tc.space})
        row[tc.metric] = value
        row["error"] = str(result.error).strip().splitlines()[-1] if result.error else ""
        rows.append(row)
    # best first: trials that ran every step before those stopped early (a value at an
    # early rung is not comparable with one at the end), then by the metric
    sign = 1 if tc.mode == "max" else -1
    rows.sort(key=lambda r: (r["status"] != "FINISHED",
                             -sign * r[tc.metric] if _scored(r, tc) else math.inf))  # fmt: skip
    return rows


def _scored(row: dict, tc: TuneConfig) -> bool:
    value = row.get(tc.metric)
    return isinstance(value, float) and math.isfinite(value)


def _close_child_runs(rows: list[dict], trials_dir: Path, uri: str, wait_s: float = 60) -> None:
    """Deliver what killed trials left in their journals; mark their runs KILLED/FAILED.

    A trial ASHA stopped a moment ago may still be exiting (its rank 0 holds the journal
    lock): `sync_journal` raises RuntimeError until it is gone, so wait up to `wait_s`."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.tracker import sync_journal

    client, deadline = MlflowClient(tracking_uri=uri), time.monotonic() + wait_s
    for row in rows:
        run_dir = trials_dir / row["trial_id"]
        id_file = run_dir / "mlflow_run_id"
        run_id = row["mlflow_run_id"] = id_file.read_text().strip() if id_file.exists() else None
        if run_id is None:
            continue
        try:
            while True:
                try:
                    sync_journal(run_dir, uri)
                    break
                except RuntimeError:  # a live Tracker (the trial's rank 0) holds the folder
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            client.set_tag(run_id, "vqtok.trial_status", row["status"])
            if client.get_run(run_id).info.status == "RUNNING":  # stopped at a report
                ended = {"FINISHED": "FINISHED", "STOPPED": "KILLED"}
                client.set_terminated(run_id, ended.get(row["status"], "FAILED"))
        except Exception as exc:  # the table matters more than one run's status
            print(f"[vqtok] trial {row['trial_id']}: MLflow update failed: {exc}", file=sys.stderr)


def _write_results(cfg: Config, tc: TuneConfig, base: dict, rows: list[dict], tracker) -> dict:
    study_dir = cfg.run.run_dir
    cols = ["trial_id", "status", "step", *tc.space, tc.metric]
    print(format_table(rows, cols))
    with open(study_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*cols, "mlflow_run_id", "error"])
        writer.writeheader()
        writer.writerows({k: _cell(r.get(k), csv=True) for k in writer.fieldnames} for r in rows)
    best = next((r for r in rows if _scored(r, tc)), None)
    summary = {"study": cfg.run.name, "metric": tc.metric, "mode": tc.mode,
               "best": best, "trials": rows}  # fmt: skip
    (study_dir / "trials.json").write_text(json.dumps(summary, indent=1))
    tracker.log_artifact(study_dir / "trials.csv")
    tracker.log_artifact(study_dir / "trials.json")
    if best is None:
        print(f"[vqtok] no trial reported {tc.metric}; no best config", file=sys.stderr)
        return summary
    values = {k: best[k] for k in tc.space}
    best_cfg = resolve(base, {**values, "run.name": f"{cfg.run.name}-best"})
    path = study_dir / "best_config.yaml"
    path.write_text(
        f"# best trial {best['trial_id']} of study {cfg.run.name}: "
        f"{tc.metric} = {best[tc.metric]:.6g} ({tc.mode}) at step {best['step']}\n"
        + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False)
    )
    tracker.log_artifact(path)
    tracker.log_metrics({f"best/{tc.metric}": best[tc.metric]}, step=best["step"])
    tracker.set_tags({"vqtok.best_trial": best["trial_id"]})
    summary["best_config"] = str(path)
    summary.update(_best_model(study_dir / "trials" / best["trial_id"], best, tc, tracker))
    return summary


def _best_model(trial_dir: Path, best: dict, tc: TuneConfig, tracker) -> dict:
    """The best trial's eval metrics on the parent (`best/...`), its model's URI as a tag
    and, with `tune.register_as`, in the model registry. {} when it has no model (a trial
    stopped before its last step exports none)."""
    from mlflow.tracking import MlflowClient

    run_id = best.get("mlflow_run_id")
    if not run_id or not (trial_dir / "model" / "MLmodel").is_file():
        print(f"[vqtok] best trial {best['trial_id']} has no exported model (stopped before "
              "train.steps): train best_config.yaml to get one", file=sys.stderr)  # fmt: skip
        return {}
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    evals = {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("eval/")}
    evals.pop(tc.metric, None)  # logged as best/<metric> already
    tracker.log_metrics({f"best/{k}": v for k, v in evals.items()}, step=best["step"])
    uri = f"runs:/{run_id}/model"
    tracker.set_tags({"vqtok.best_model": uri})
    out = {"best_model": uri}
    if tc.register_as:
        import mlflow

        # register_model reads the process's store: point the environment at the study's
        # for the call (mlflow.set_tracking_uri would pin it for the rest of the process)
        before = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = tracker.tracking_uri
        try:
            version = mlflow.register_model(uri, tc.register_as)
        finally:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before
        out["registered"] = f"models:/{tc.register_as}/{version.version}"
    return out


def format_table(rows: list[dict], cols: list[str]) -> str:
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, cells)])


def _cell(value: Any, csv: bool = False) -> Any:
    if csv:
        return json.dumps(value) if isinstance(value, (list, dict)) else value
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="a training config with a tune: section")
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides, e.g. tune.num_samples=4 train.steps=100")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        cfg, tc, base = load_study(args.config, args.overrides)
        summary = run_study(cfg, tc, base)
    except ConfigError as exc:
        print(f"vqtok tune: {exc}", file=sys.stderr)
        return 2
    print(f"[vqtok] study folder: {cfg.run.run_dir}")
    if summary.get("best_config"):
        print(f"[vqtok] best config: {summary['best_config']}  (vqtok train it)")
    if summary.get("best_model"):
        print(f"[vqtok] best model: {summary['best_model']}"
              + (f"  (registered: {summary['registered']})" if summary.get("registered") else ""))  # fmt: skip
    print(f"[vqtok] MLflow: mlflow ui --backend-store-uri {summary['tracking_uri']}")
    return 0 if summary["best"] else 1
