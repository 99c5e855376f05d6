"""`vqtok ablate STUDY.yaml`: train one config in several variants over several seeds, one
table of results with the paper's orderings checked.

    vqtok ablate jobs/ablate_looc.yaml [k=v ...] [--scale tiny|cpu|gpu] [--variants a,b] [--local]

(`key=value` overrides right after the study file: argparse takes them as one positional list.)

A study file is a run config (the sections of `pipelines.config`) plus an `ablation:` section:
- `study` (its name), `title`, `source` (the seed and its table/figure), `claim` (its text),
  `notes` (our deviations, for docs/RESULTS.md);
- `scales`: named sets of dotted overrides (`tiny` for tests, `cpu`, `gpu`); `scale` the default;
- `variants`: name -> a `model.quantizer` spec, or `{quantizer: spec, dotted.key: value, ...}`,
  or `{dotted.key: value, section: {...}, ...}` (no `quantizer` key: the model's own is kept;
  a section, e.g. `model:`, replaces the file's whole section);
- `seeds`: `train.seed` of each repeat (default: the file's `train.seed`); the data order and
  the validation batches (`data.seed`) stay fixed, so every run is scored on the same set;
- `orderings`: the paper's pairwise claims `[better, worse, metric, higher_is_better]`,
  checked by `pipelines.studies.ablation_report.check_ordering` (yes / no / inconclusive);
- `columns`: the metric keys of the table (`ablation_report.METRICS`); `reference`: the
  paper's numbers `{title, values: {variant: text}}`; `curves`: metric keys copied from every
  run into the parent run as `<run>/<key>` on the runs' own step axis (one chart per key);
- `data`: `{out: FOLDER, ...}` of `pipelines.studies.ablation_data.make_ablation_data`: made before the
  first run unless it is there; `{data}` in `data.shards` / `train.eval_shards` is that folder;
- `models`: name -> overrides of the base config, as a variant's (e.g. a teacher tokenizer):
  each is trained once, before the variants, into `<study folder>/_models/<name>` (kept and
  reused when that run has finished), and `{models}` in any variant's value is that folder;
- `parallel`: with `--local`, how many runs train at once, each in its own process with
  cores / parallel torch threads (default 1; one run per core is the fastest on a small CPU
  machine: a tiny model does not use 2 threads well). Under Ray runs go one after another.
Config of a run: file sections <- the scale's overrides <- `key=value` overrides <- the
variant <- its seed. Overrides `ablation.KEY=value` change the section itself (e.g.
`ablation.seeds=[0]`, `ablation.data.out=/tmp/d`), as do a scale's `ablation.*` keys.

Each run (variant × seed) is trained with `pipelines.training.launch.fit` (Ray Train, or `--local`) into
`<run.storage>/<study>/<variant>-s<seed>`, as an MLflow run nested under one parent run
`<study>`, evaluated (EMA weights on `train.eval_shards`) and scored by
`pipelines.studies.ablation_metrics` (encode time, highest wavelet band error, F_L alone, codebook
size). `results.md` and `results.json` go to `<run.storage>/<study>/` and to the parent run.
A study runs in parts with `--variants`: results.json keeps the rows already in it of the
variants not run now when their config (`ablation_report.recipe_of`) and scale are the same,
so parts run one after another (or in other sessions, the file copied back) make one table.
Without a tracking URI (`run.tracking_uri` or `MLFLOW_TRACKING_URI`) all runs share one
SQLite store in the study folder, so the children really nest under the parent.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipelines.config import (
    Config,
    ConfigError,
    from_dict,
    parse_override,
    read_sections,
    set_dotted,
    validate,
)
from pipelines.studies.ablation_report import (
    DEFAULT_COLUMNS,
    RATE_COLUMNS,
    aggregate,
    check_orderings,
    device_description,
    format_results,
    format_table,
    git_revision,
    merge_runs,
    quantizer_label,
    recipe_of,
    variant_label,
)

__all__ = ["Study", "format_table", "load_study", "quantizer_label", "run_study"]

SPEC_KEYS = {"study", "title", "source", "claim", "scale", "scales", "variants", "seeds",
             "orderings", "columns", "reference", "curves", "data", "parallel", "notes",
             "models"}  # fmt: skip
MODELS = "_models"  # the study folder's subfolder of the `models:` runs
DEFAULT_CURVES = ("train/total", "eval/psnr", "eval/ssim")
_SECTIONS = {f.name for f in fields(Config)}


@dataclass
class Study:
    name: str
    scale: str
    folder: Path
    configs: dict[str, Config] = field(default_factory=dict)  # variant -> config (seed aside)
    models: dict[str, Config] = field(default_factory=dict)  # `models:` runs, before the variants
    seeds: list[int] = field(default_factory=list)
    recipes: dict[str, str] = field(default_factory=dict)  # every variant -> recipe_of(config)
    spec: dict = field(default_factory=dict)  # the `ablation:` section, overrides applied
    path: Path | None = None

    @property
    def data(self) -> dict | None:
        return self.spec.get("data")


def load_study(
    path: str | Path,
    overrides: list[str] = (),
    scale: str | None = None,
    variants: list[str] | None = None,
) -> Study:
    """Every variant's validated Config; errors name the file, the variant and the key."""
    path = Path(path)
    raw = read_sections(path)
    spec = raw.pop("ablation", None)
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: no `ablation:` section (study, scales, variants)")
    pairs = [parse_override(item) for item in overrides]
    scale = scale or spec.get("scale")
    scales = spec.get("scales") or {}
    if scale is not None and scale not in scales:
        raise ConfigError(f"ablation.scale: {scale!r} is not one of {sorted(scales)}")
    scaled = dict(scales.get(scale) or {}) if scale else {}
    # the section itself: the file <- the scale's `ablation.*` keys <- the command line's
    for key, value in [*scaled.items(), *pairs]:
        if key.startswith("ablation."):
            set_dotted(spec, key.removeprefix("ablation."), value)
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown ablation key(s) {unknown}; known: {sorted(SPEC_KEYS)}")
    name = str(spec.get("study") or path.stem)
    all_variants = spec.get("variants") or {}
    chosen = variants or list(all_variants)
    missing = [v for v in chosen if v not in all_variants]
    if missing or not chosen:
        raise ConfigError(f"ablation.variants: {missing or 'none'} not in {list(all_variants)}")
    _check_orderings(spec.get("orderings") or [], all_variants, path)
    base = copy.deepcopy(raw)
    for key, value in [*scaled.items(), *pairs]:
        if not key.startswith("ablation."):
            set_dotted(base, key, value)
    if spec.get("data") is not None:
        if not isinstance(spec["data"], dict) or not spec["data"].get("out"):
            raise ConfigError(f"{path}: ablation.data needs `out: FOLDER`, got {spec['data']!r}")
        spec["data"] = {
            **spec["data"],
            "out": str(Path(spec["data"]["out"]).expanduser().resolve()),
        }
        _fill_data_folder(base, spec["data"]["out"])
    storage = Path(base.get("run", {}).get("storage", "runs")).expanduser().resolve()
    seeds = spec.get("seeds") or [base.get("train", {}).get("seed", 42)]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"ablation.seeds: expected a list of integers, got {seeds!r}")
    study = Study(name, scale or "-", storage / name, seeds=list(seeds), spec=spec, path=path)
    models = spec.get("models") or {}
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: ablation.models: expected name -> overrides, got {models!r}")
    for model, v in models.items():
        study.models[model] = _variant_config(base, model, v, study.folder / MODELS, "model")
    models_folder = str(study.folder / MODELS)
    data_out = (spec.get("data") or {}).get("out", "{data}")
    configs = {}
    for variant in all_variants:  # every variant's recipe: a part's results keep the others'
        v = _fill(all_variants[variant], "{models}", models_folder)
        configs[variant] = _variant_config(base, variant, v, study.folder, "variant")
        study.recipes[variant] = recipe_of(configs[variant].to_dict(), study=study.folder,
                                           data=data_out)  # fmt: skip
    study.configs = {variant: configs[variant] for variant in chosen}
    return study


def _variant_config(base: dict, name: str, v: Any, storage: Path, what: str) -> Config:
    """`base` with a variant's overrides, run `name` under `storage`; validated."""
    cfg_raw = copy.deepcopy(base)
    if not isinstance(v, dict):
        raise ConfigError(f"ablation {what} {name!r}: expected a mapping, got {v!r}")
    # a mapping of overrides (dotted keys, whole sections, `quantizer`), else a quantizer spec
    plain = not v or "quantizer" in v or any("." in k or k in _SECTIONS for k in v)
    extra = dict(v) if plain else {"quantizer": v}
    if "quantizer" in extra:
        set_dotted(cfg_raw, "model.quantizer", extra.pop("quantizer"))
    for key, value in extra.items():
        set_dotted(cfg_raw, key, value)
    set_dotted(cfg_raw, "run.name", name)
    set_dotted(cfg_raw, "run.storage", str(storage))
    try:
        cfg = from_dict(Config, cfg_raw, "")
        validate(cfg)  # builds the quantizer once: a bad key fails here
    except ConfigError as exc:
        raise ConfigError(f"ablation {what} {name!r}: {exc}") from exc
    return cfg


def _fill(value: Any, placeholder: str, text: str) -> Any:
    """`value` with `placeholder` replaced by `text` in every string inside it."""
    if isinstance(value, str):
        return value.replace(placeholder, text)
    if isinstance(value, dict):
        return {k: _fill(v, placeholder, text) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, placeholder, text) for v in value]
    return value


def _fill_data_folder(base: dict, folder: str) -> None:
    """`{data}` in the shard lists -> the study's data folder."""
    for section, key in (("data", "shards"), ("train", "eval_shards")):
        value = base.get(section, {}).get(key)
        if isinstance(value, str):
            value = [value]
        if value:
            base[section][key] = [str(s).replace("{data}", folder) for s in value]


def _check_orderings(orderings: list, variants: dict, path: Path) -> None:
    for o in orderings:
        ok = isinstance(o, list) and len(o) in (3, 4) and all(isinstance(x, str) for x in o[:3])
        if not ok or (len(o) == 4 and not isinstance(o[3], bool)):
            raise ConfigError(f"{path}: ablation.orderings: expected [better, worse, metric, "
                              f"higher_is_better], got {o!r}")  # fmt: skip
        for name in o[:2]:
            if name not in variants:
                raise ConfigError(f"{path}: ablation.orderings: {name!r} is not a variant")


# --- running -----------------------------------------------------------------------------


def run_study(study: Study, local: bool = False, command: str | None = None) -> dict:
    """Make the data if asked, train and score every variant × seed, write the tables;
    returns the result (what results.json holds)."""
    from pipelines.studies.ablation_metrics import run_extra_metrics
    from pipelines.tracking.progress import Progress
    from pipelines.tracking.tracker import Tracker
    from pipelines.training.launch import fit

    data_sizes = None
    if study.data:
        from pipelines.studies.ablation_data import ensure_ablation_data, size_summary

        args = {k: v for k, v in study.data.items() if k != "out"}
        try:
            data_sizes = size_summary(ensure_ablation_data(study.data["out"], **args))
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    first = next(iter(study.configs.values()))
    study.folder.mkdir(parents=True, exist_ok=True)
    uri = first.run.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{study.folder / 'mlflow.db'}"  # fmt: skip
    parent = Tracker(study.folder / "_parent", uri, first.run.experiment)  # its own journal
    parent_id = parent.start(
        study.name,
        params={"scale": study.scale, "seeds": study.seeds, "command": command,
                "variants": {k: c.model.quantizer_specs() for k, c in study.configs.items()}},
        tags={"vqtok.kind": "ablation"},
    )  # fmt: skip
    if parent_id is None:
        print(f"[vqtok] MLflow at {uri} unreachable: variant runs are not nested", file=sys.stderr)
    runs, status = [], "FAILED"
    curves = study.spec.get("curves", DEFAULT_CURVES)
    models = {}
    jobs = []
    for variant, base in study.configs.items():
        for seed in study.seeds:
            cfg = copy.deepcopy(base)
            cfg.train.seed, cfg.run.name = seed, f"{variant}-s{seed}"
            cfg.run.tracking_uri, cfg.run.parent_run_id = uri, parent_id
            jobs.append((cfg, variant, seed))
    parallel = int(study.spec.get("parallel") or 1) if local else 1
    progress = Progress("ablate", total=len(jobs), unit="runs", every_s=0)
    try:
        for name, model_cfg in study.models.items():  # nested under the parent too
            model_cfg.run.tracking_uri, model_cfg.run.parent_run_id = uri, parent_id
            models[name] = _ensure_model(model_cfg, local, fit, run_extra_metrics)
        if parallel > 1:
            threads = max(1, (os.cpu_count() or 1) // parallel)
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
            with ProcessPoolExecutor(parallel, mp_context=ctx) as pool:
                done = pool.map(_run_in_process, [(*job, threads) for job in jobs])
                for (cfg, _, _), row in zip(jobs, done):  # in job order, as they finish
                    runs.append(row)
                    _log_to_parent(parent, cfg, row, curves)
                    progress.update(done=1)
        else:
            for cfg, variant, seed in jobs:
                runs.append(_run_one(cfg, variant, seed, local, fit, run_extra_metrics))
                _log_to_parent(parent, cfg, runs[-1], curves)
                progress.update(done=1)
        progress.close()
        rev = git_revision()
        for row in runs:
            row.update(recipe=study.recipes[row["variant"]], git=rev)
        earlier_file = study.folder / "results.json"
        earlier = json.loads(earlier_file.read_text()) if earlier_file.is_file() else None
        runs, kept = merge_runs(earlier, runs, study.recipes, study.scale)
        if kept:
            print(f"[vqtok] ablation: kept the runs of {', '.join(kept)} from {earlier_file}",
                  file=sys.stderr)  # fmt: skip
        if kept and earlier.get("command"):
            command = f"{earlier['command']}; then {command}"
        result = _result(study, runs, data_sizes, command)
        if models:
            result["models"] = models
        text = (
            f"# {study.spec.get('title', study.name)} ({study.scale})\n\n{format_results(result)}"
        )
        (study.folder / "results.md").write_text(text)
        (study.folder / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        parent.log_artifact(study.folder / "results.md")
        parent.log_dict(result, "results.json")
        status = "FINISHED" if not any(r.get("error") for r in runs) else "FAILED"
    finally:
        parent.end(status)
    return result


def _ensure_model(cfg: Config, local: bool, fit, extra) -> dict:
    """Train a `models:` run unless its folder holds a finished one (its exported model);
    its row (metrics of the last eval) either way. A failed one stops the study."""
    from pipelines.store.models import load_model

    done = cfg.run.run_dir / "model"
    if done.is_dir():
        print(f"[vqtok] ablation: reusing {done}", file=sys.stderr)
        load_model(done)  # a broken folder fails here, naming it, not in every variant
        metrics = _last_metrics(cfg.run.run_dir)
        return {"run": str(cfg.run.run_dir), "quantizer": variant_label(cfg),
                "metrics": {k: v for k, v in metrics.items() if k.startswith("eval/")}}
    row = _run_one(cfg, cfg.run.name, cfg.train.seed, local, fit, extra)
    if row.get("error"):
        raise ConfigError(f"ablation model {cfg.run.name!r} failed: {row['error']}")
    return {"run": str(cfg.run.run_dir), **row}


def _run_in_process(job: tuple) -> dict:
    """A pool worker: one local run with `threads` torch threads."""
    import torch

    from pipelines.studies.ablation_metrics import run_extra_metrics
    from pipelines.training.launch import fit

    cfg, variant, seed, threads = job
    torch.set_num_threads(threads)
    if not torch.distributed.is_initialized():  # a port inherited from the parent is taken
        os.environ.pop("MASTER_PORT", None)
    return _run_one(cfg, variant, seed, True, fit, run_extra_metrics)


def _run_one(cfg: Config, variant: str, seed: int, local: bool, fit, extra) -> dict:
    print(f"[vqtok] ablation: training {cfg.run.name}", file=sys.stderr, flush=True)
    row = {"variant": variant, "seed": seed, "quantizer": variant_label(cfg)}
    t0 = time.perf_counter()
    try:
        metrics = fit(cfg, local=local)
    except Exception as exc:  # one broken run must not lose the others' results
        metrics, row["error"] = {}, f"{type(exc).__name__}: {str(exc)[:200]}"
        print(f"[vqtok] run {cfg.run.name} failed: {row['error']}", file=sys.stderr)
    row["seconds"] = time.perf_counter() - t0
    metrics = {**_last_metrics(cfg.run.run_dir), **metrics}
    if not row.get("error"):
        try:
            metrics.update(extra(cfg, cfg.run.run_dir))
        except Exception as exc:  # the table keeps the training metrics
            row["extra_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"[vqtok] scoring {cfg.run.name} failed: {row['extra_error']}", file=sys.stderr)
    row["metrics"] = {k: v for k, v in metrics.items()
                      if k.startswith("eval/") or k in ("train/total", "train/teacher")}  # fmt: skip
    row["steps"] = int(metrics["step"]) if "step" in metrics else cfg.train.steps
    return row


def _log_to_parent(parent, cfg: Config, row: dict, curves) -> None:
    """The run's final numbers (step 0) and its curves (own steps) into the parent run."""
    name = cfg.run.name
    final = {f"{name}/{k.split('/', 1)[1]}": v for k, v in row["metrics"].items()
             if isinstance(v, (int, float))}  # fmt: skip
    if final:
        parent.log_metrics(final, step=0)
    for step, metrics in _journal(cfg.run.run_dir):
        picked = {f"curves/{name}/{k}": v for k, v in metrics.items() if k in curves}
        if picked:
            parent.log_metrics(picked, step=step)


def _journal(run_dir: Path) -> list[tuple[int, dict]]:
    """(step, metrics) of every line of a run folder's `metrics.jsonl`."""
    out = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                out.append((int(rec.get("step", 0)), dict(rec.get("metrics", {}))))
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                continue  # a line cut by a crash
    return out


def _last_metrics(run_dir: Path) -> dict[str, float]:
    """The newest value of every metric in a run folder's journal."""
    out: dict[str, float] = {}
    for _, metrics in _journal(run_dir):
        out.update(metrics)
    return out


def with_rate_columns(columns) -> list[str]:
    """A study's columns, then the rate and the bicubic at it (`RATE_COLUMNS`)."""
    return list(columns) + [k for k in RATE_COLUMNS if k not in columns]


def _result(study: Study, runs: list[dict], data_sizes: dict | None, command: str | None) -> dict:
    summary = aggregate(runs)
    ran = {r["variant"] for r in runs}
    revisions = " + ".join(dict.fromkeys(r["git"] for r in runs if r.get("git")))
    return {
        "study": study.name, "title": study.spec.get("title", study.name),
        "scale": study.scale, "seeds": study.seeds,
        "variants": [v for v in study.recipes if v in ran],  # the study's order, parts merged
        "columns": with_rate_columns(study.spec.get("columns") or DEFAULT_COLUMNS),
        "reference": study.spec.get("reference"), "runs": runs, "summary": summary,
        "orderings": check_orderings(summary, study.spec.get("orderings") or []),
        "data": data_sizes, "device": device_description(next(iter(study.configs.values()))),
        "command": command, "git": revisions or git_revision(),
    }  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", type=Path, help="a study file, e.g. jobs/pvq_ablation.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides (ablation.KEY=... too)")
    p.add_argument("--scale", default=None, help="a name under ablation.scales (tiny, cpu, gpu)")
    p.add_argument("--variants", default=None, help="a comma-separated subset of the study's "
                   "variants (the names under ablation.variants), e.g. vq,pvq; default: all")  # fmt: skip
    p.add_argument("--local", action="store_true", help="one process per variant, no Ray")


def run(args: argparse.Namespace) -> int:
    command = shlex.join(["vqtok", "ablate", str(args.study),
                          *(["--scale", args.scale] if args.scale else []),
                          *(["--variants", args.variants] if args.variants else []),
                          *args.overrides, *(["--local"] if args.local else [])])  # fmt: skip
    try:
        variants = [v for v in (args.variants or "").split(",") if v] or None
        study = load_study(args.study, args.overrides, args.scale, variants)
        result = run_study(study, local=args.local, command=command)
    except ConfigError as exc:
        print(f"vqtok ablate: {exc}", file=sys.stderr)
        return 2
    print(format_results(result))
    print(f"[vqtok] results in {study.folder / 'results.md'}")
    return 0 if not any(r.get("error") for r in result["runs"]) else 1
