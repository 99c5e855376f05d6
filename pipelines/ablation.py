"""`vqtok ablate STUDY.yaml`: train one config with several quantizers, one table of results.

    vqtok ablate jobs/pvq_ablation.yaml [--scale cpu|gpu] [--variants vq,pvq] [k=v ...] [--local]

A study file is a run config (the sections of `pipelines.config`) plus an `ablation:` section:
`study` (its name), `scales` (named sets of dotted overrides, e.g. `cpu` and `gpu`; `scale`
picks the default) and `variants` (name -> a `model.quantizer` spec, or
`{quantizer: spec, dotted.key: value, ...}` for a variant that changes more). Each variant's
config is: file sections <- the scale's overrides <- command-line overrides <- the variant.

Every variant is trained with `pipelines.train.fit` (Ray Train, or `--local`) into
`<run.storage>/<study>/<variant>`, as an MLflow run nested under one parent run `<study>`,
and evaluated (EMA weights on `train.eval_shards`, at its last step). The table
(`results.md`, `results.json`) goes to `<run.storage>/<study>/` and to the parent run.
Without a tracking URI (`run.tracking_uri` or `MLFLOW_TRACKING_URI`) all runs share one
SQLite store in the study folder, so the children really nest under the parent.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Config, ConfigError, from_dict, validate

# Seed 004, supplementary Table 1 (COCO-Val / WebVid-Val PSNR), for the "paper" column.
PAPER_PSNR = {
    "vq": (31.45, 32.91), "gvq": (32.25, 33.34), "lfq": (34.22, 33.92), "rvq": (33.92, 34.22),
    "psvq": (34.45, 34.98), "rvq_lfq": (34.78, 35.27), "pvq": (35.12, 36.01),
}  # fmt: skip

# (column title, metric key, format); a column shows "—" where a run has no value
COLUMNS = (
    ("PSNR dB", "eval/psnr", "{:.2f}"),
    ("SSIM", "eval/ssim", "{:.4f}"),
    ("LPIPS", "eval/lpips", "{:.4f}"),
    ("usage", "eval/quantizer_usage", "{:.3f}"),
    ("bits/token", "eval/bits_per_token", "{:.2f}"),
)


@dataclass
class Study:
    name: str
    scale: str
    folder: Path
    configs: dict[str, Config] = field(default_factory=dict)


def load_study(
    path: str | Path,
    overrides: list[str] = (),
    scale: str | None = None,
    variants: list[str] | None = None,
) -> Study:
    """Every variant's validated Config; errors name the file, the variant and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    spec = raw.pop("ablation", None)
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: no `ablation:` section (study, scales, variants)")
    unknown = sorted(set(spec) - {"study", "scale", "scales", "variants"})
    if unknown:
        raise ConfigError(f"{path}: unknown ablation key(s) {unknown}")
    name = str(spec.get("study") or path.stem)
    scales, all_variants = spec.get("scales") or {}, spec.get("variants") or {}
    scale = scale or spec.get("scale")
    if scale is not None and scale not in scales:
        raise ConfigError(f"ablation.scale: {scale!r} is not one of {sorted(scales)}")
    chosen = variants or list(all_variants)
    missing = [v for v in chosen if v not in all_variants]
    if missing or not chosen:
        raise ConfigError(f"ablation.variants: {missing or 'none'} not in {list(all_variants)}")
    base = copy.deepcopy(raw)
    for key, value in (scales.get(scale) or {}).items() if scale else ():
        _set(base, key, value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set(base, key.strip(), yaml.safe_load(value))
    storage = Path(base.get("run", {}).get("storage", "runs")).expanduser().resolve()
    study = Study(name, scale or "-", storage / name)
    for variant in chosen:
        cfg_raw = copy.deepcopy(base)
        v = all_variants[variant]
        if not isinstance(v, dict):
            raise ConfigError(f"ablation.variants.{variant}: expected a mapping, got {v!r}")
        extra = dict(v) if "quantizer" in v else {"quantizer": v}
        _set(cfg_raw, "model.quantizer", extra.pop("quantizer"))
        for key, value in extra.items():
            _set(cfg_raw, key, value)
        _set(cfg_raw, "run.name", variant)
        _set(cfg_raw, "run.storage", str(study.folder))
        try:
            cfg = from_dict(Config, cfg_raw, "")
            validate(cfg)  # builds the quantizer once: a bad key fails here
        except ConfigError as exc:
            raise ConfigError(f"ablation variant {variant!r}: {exc}") from exc
        study.configs[variant] = cfg
    return study


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{dotted}: {p!r} is a value, not a section")
    d[leaf] = value


# --- the table ---------------------------------------------------------------------------


def quantizer_label(spec: dict) -> str:
    """A short description of a quantizer spec: `pyramid(lfq d=16) ×3`, `vq K=4096`."""
    kind = spec.get("type", "?")
    parts = [kind]
    if "codebook_size" in spec:
        parts.append(f"K={spec['codebook_size']}")
    if "codebook_dim" in spec:
        parts.append(f"d={spec['codebook_dim']}")
    if isinstance(spec.get("inner"), dict):
        parts[0] = f"{kind}({quantizer_label(spec['inner'])})"
    levels = spec.get("num_quantizers") or len(spec.get("scales", ())) or None
    return " ".join(parts) + (f" ×{levels}" if levels else "")


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return fmt.format(value)


def format_table(rows: list[dict]) -> str:
    """Markdown table of the variants. A row: `variant`, `quantizer` (label), `metrics`
    (key -> value), and optionally `steps`, `seconds`, `error`. Columns whose metric no row
    has (e.g. LPIPS without backbone weights) are left out; the paper's PSNR is shown for
    the seed's seven variant names."""
    columns = [c for c in COLUMNS if any(r.get("metrics", {}).get(c[1]) is not None for r in rows)]
    head = ["variant", "quantizer", *(c[0] for c in columns)]
    paper = any(r["variant"] in PAPER_PSNR for r in rows)
    if paper:
        head.append("paper PSNR (COCO / WebVid)")
    head += ["steps", "time s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        m = r.get("metrics", {})
        cells = [r["variant"], r.get("quantizer", "")]
        cells += [_cell(m.get(key), fmt) for _, key, fmt in columns]
        if paper:
            ref = PAPER_PSNR.get(r["variant"])
            cells.append(f"{ref[0]:.2f} / {ref[1]:.2f}" if ref else "—")
        cells.append(_cell(r.get("steps"), "{:d}"))
        cells.append(_cell(r.get("seconds"), "{:.0f}"))
        cells.append("ok" if not r.get("error") else "failed: " + r["error"].replace("|", "/"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _last_metrics(run_dir: Path) -> dict[str, float]:
    """The newest value of every metric in a run folder's journal (`metrics.jsonl`)."""
    out: dict[str, float] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.update(json.loads(line).get("metrics", {}))
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut by a crash
    return out


# --- running -----------------------------------------------------------------------------


def run_study(study: Study, local: bool = False) -> list[dict]:
    """Train and evaluate every variant; write the table; returns the rows."""
    from pipelines.tracking import Tracker
    from pipelines.train import fit

    first = next(iter(study.configs.values()))
    study.folder.mkdir(parents=True, exist_ok=True)
    uri = first.run.tracking_uri or _env_uri() or f"sqlite:///{study.folder / 'mlflow.db'}"
    parent = Tracker(study.folder / "_parent", uri, first.run.experiment)  # its own journal
    parent_id = parent.start(
        study.name,
        params={"scale": study.scale, "variants": {k: c.model["quantizer"]
                                                    for k, c in study.configs.items()}},
        tags={"vqtok.kind": "ablation"},
    )  # fmt: skip
    if parent_id is None:
        print(f"[vqtok] MLflow at {uri} unreachable: variant runs are not nested", file=sys.stderr)
    rows, status = [], "FAILED"
    try:
        for variant, cfg in study.configs.items():
            cfg.run.tracking_uri, cfg.run.parent_run_id = uri, parent_id
            print(f"[vqtok] ablation {study.name}: training {variant}", file=sys.stderr, flush=True)
            row = {"variant": variant, "quantizer": quantizer_label(cfg.model["quantizer"])}
            t0 = time.perf_counter()
            try:
                metrics = fit(cfg, local=local)
            except Exception as exc:  # one broken variant must not lose the others' results
                metrics, row["error"] = {}, f"{type(exc).__name__}: {str(exc)[:200]}"
                print(f"[vqtok] variant {variant} failed: {row['error']}", file=sys.stderr)
            row["seconds"] = time.perf_counter() - t0
            metrics = {**_last_metrics(cfg.run.run_dir), **metrics}
            row["metrics"] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
            row["steps"] = int(metrics["step"]) if "step" in metrics else cfg.train.steps
            rows.append(row)
            for _, key, _ in COLUMNS:
                if row["metrics"].get(key) is not None:
                    parent.log_metrics({f"{variant}/{key.split('/', 1)[1]}": row["metrics"][key]},
                                       step=0)  # fmt: skip
        table = format_table(rows)
        (study.folder / "results.md").write_text(f"# {study.name} ({study.scale})\n\n{table}")
        (study.folder / "results.json").write_text(json.dumps(rows, indent=1))
        parent.log_artifact(study.folder / "results.md")
        parent.log_dict(rows, "results.json")
        status = "FINISHED" if not any(r.get("error") for r in rows) else "FAILED"
    finally:
        parent.end(status)
    return rows


def _env_uri() -> str | None:
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", type=Path, help="a study file, e.g. jobs/pvq_ablation.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every variant")
    p.add_argument("--scale", default=None, help="a name under ablation.scales (cpu, gpu)")
    p.add_argument("--variants", default=None, help="comma-separated subset, in this order: vq,pvq")
    p.add_argument("--local", action="store_true", help="one process per variant, no Ray")


def run(args: argparse.Namespace) -> int:
    try:
        variants = [v for v in (args.variants or "").split(",") if v] or None
        study = load_study(args.study, args.overrides, args.scale, variants)
        rows = run_study(study, local=args.local)
    except ConfigError as exc:
        print(f"vqtok ablate: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"[vqtok] results in {study.folder / 'results.md'}")
    return 0 if not any(r.get("error") for r in rows) else 1
