"""The tables of `vqtok ablate`: seeds aggregated, the paper's orderings checked, results.md
(docs/RESULTS.md is put together from them by `pipelines.studies.ablation_page`). Pure functions of
numbers, unit-tested on fixed ones; and the provenance results.json records (device, git).

A run row (one variant × one seed): `variant`, `seed`, `quantizer` (label), `metrics`
(key -> value), `steps`, `seconds`, `recipe` (its config's fingerprint), `git`, optional
`error`. A summary row (one variant): `variant`,
`quantizer`, `seeds` (those that ran), `stats` (key -> {mean, std, min, max, n}), `steps`,
`seconds` (mean per run), `errors`.

The ordering rule (issue 11: "reproduced only when the gap exceeds the spread"), for a paper
ordering `[better, worse, metric, higher_is_better]` over the seeds' values B and W:
- `yes`: min(B) > max(W) (max(B) < min(W) when lower is better): every seed of the better
  variant beats every seed of the worse one, i.e. the mean gap exceeds the two ranges;
- `no`: the same with the two swapped: ours is reversed beyond the spread;
- `inconclusive`: the ranges overlap, or either side has fewer than 2 seeds (no spread to
  compare; `direction` still says which way ours points);
- `not run`: a variant or the metric is missing (failed or not selected).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

# metric key -> (column title, format); a study lists the keys it shows (`ablation.columns`)
METRICS: dict[str, tuple[str, str]] = {
    "eval/psnr": ("PSNR dB", "{:.2f}"),
    "eval/ssim": ("SSIM", "{:.4f}"),
    "eval/chroma_kept": ("colour kept", "{:.2f}"),  # output chroma power / input's (metrics.py)
    "eval/lpips": ("LPIPS", "{:.4f}"),
    "eval/mse": ("MSE", "{:.5f}"),
    "eval/hf_mse": ("HF-band MSE", "{:.6f}"),
    "eval/low_psnr": ("F_L-only PSNR", "{:.2f}"),
    "eval/low_hf_mse": ("F_L-only HF MSE", "{:.6f}"),
    "eval/quantizer_usage": ("usage", "{:.3f}"),
    "eval/quantizer_perplexity": ("perplexity", "{:.1f}"),
    "eval/quantizer_usage_layer1": ("usage L1", "{:.3f}"),
    "eval/quantizer_usage_layer2": ("usage L2", "{:.3f}"),
    "eval/quantizer_usage_layer3": ("usage L3", "{:.3f}"),
    "eval/quantizer0_usage": ("usage F_L", "{:.3f}"),
    "eval/quantizer1_usage": ("usage F_H", "{:.3f}"),
    "eval/bits_per_token": ("bits/token", "{:.2f}"),
    "eval/codebook_params": ("codebook params", "{:.0f}"),
    "eval/encode_ms": ("encode ms/img", "{:.2f}"),
    "eval/quantize_ms": ("quantize ms/img", "{:.3f}"),
    "train/total": ("final loss", "{:.4f}"),
    "train/teacher": ("teacher loss", "{:.4f}"),
    # the rate and what resampling does at it, on the same frames (vqcore/references.py)
    "eval/compression_ratio": ("ratio ×", "{:.1f}"),
    "eval/bits_per_pixel": ("bits/pixel", "{:.3g}"),
    "eval/reference_rate_psnr": ("bicubic at rate dB", "{:.2f}"),
    "eval/beats_rate": ("beats bicubic", "{:.2f}"),
}
# shown on every study's table, after its own columns
RATE_COLUMNS = ("eval/bits_per_pixel", "eval/compression_ratio", "eval/reference_rate_psnr",
                "eval/beats_rate")  # fmt: skip
DEFAULT_COLUMNS = ("eval/psnr", "eval/ssim", "eval/lpips", "eval/quantizer_usage",
                   "eval/bits_per_token")  # fmt: skip
# shown after SSIM wherever a run logged them, whatever the study lists: a grey model's PSNR
# alone hides that it returns no colour (BENCHMARKS.md, "Colour")
LOGGED_COLUMNS = ("eval/chroma_kept",)


def shown_columns(columns) -> list[str]:
    """A study's columns with `LOGGED_COLUMNS` after SSIM (or PSNR, or first)."""
    out = [k for k in columns if k not in LOGGED_COLUMNS]
    at = next((out.index(k) + 1 for k in ("eval/ssim", "eval/psnr") if k in out), 0)
    return out[:at] + list(LOGGED_COLUMNS) + out[at:]


def quantizer_label(spec: dict) -> str:
    """A short description of a quantizer spec: `pyramid(lfq d=16) ×3`, `vq K=4096`."""
    kind = spec.get("type", "?")
    parts = [kind]
    for key, short in (("codebook_size", "K"), ("codebook_dim", "d"), ("alpha", "α"),
                       ("num_subspaces", "S")):  # fmt: skip
        if key in spec:
            parts.append(f"{short}={spec[key]}")
    if spec.get("cvq") and kind != "looc":  # LooC re-anchors by default
        parts.append("+CVQ")
    for key in ("grouping", "distance"):  # non-default matching and grouping
        if key in spec:
            parts.append(str(spec[key]))
    if isinstance(spec.get("inner"), dict):
        parts[0] = f"{kind}({quantizer_label(spec['inner'])})"
    levels = spec.get("num_quantizers") or spec.get("num_layers") or len(spec.get("scales", ()))
    weights = spec.get("level_loss_weights")  # set by hand: the levels whose losses count
    return (" ".join(parts) + (f" ×{levels}" if levels else "")
            + (f" losses {'/'.join(f'{w:g}' for w in weights)}" if weights else ""))  # fmt: skip


def variant_label(cfg: Any) -> str:
    """The table's second column (`cfg`, a run Config): the quantizer, the model switches
    of PVQ-VAE/HFSVQ, and the teacher alignment when it is on."""
    model = cfg.model
    specs = model.quantizer_specs()  # the flavour's, overrides applied
    label = " + ".join(f"{name} {quantizer_label(s)}".strip() for name, s in specs.items())
    off = [b for b in ("fft", "dwt") if getattr(model, f"use_{b}", None) is False]
    label += " w/o " + "+".join(off).upper() if off else ""
    if getattr(model, "decoder_blocks", 0):
        label += f" + {model.decoder_blocks} decoder blocks"
    loss = cfg.loss
    if loss.teacher_weight > 0:
        label += f" + teacher {loss.teacher.distance} ×{loss.teacher_weight:g}"
    return label


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return fmt.format(value)


def _stat_cell(stat: dict | None, fmt: str) -> str:
    """`mean` for one seed; `mean ± std` (sample std) for several."""
    if not stat:
        return "—"
    if stat["n"] < 2:
        return _cell(stat["mean"], fmt)
    return f"{_cell(stat['mean'], fmt)} ± {_cell(stat['std'], fmt)}"


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "n": len(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}  # fmt: skip


def aggregate(runs: list[dict]) -> list[dict]:
    """One summary row per variant (in first-seen order) over its seeds; failed runs add to
    `errors` and leave the statistics."""
    out: dict[str, dict] = {}
    for r in runs:
        row = out.setdefault(r["variant"], {"variant": r["variant"], "quantizer": r.get("quantizer", ""),
                                            "seeds": [], "values": {}, "steps": r.get("steps"),
                                            "seconds": [], "errors": []})  # fmt: skip
        if r.get("seconds") is not None:
            row["seconds"].append(r["seconds"])
        if r.get("error"):
            row["errors"].append(r["error"])
            continue
        row["seeds"].append(r.get("seed"))
        for key, value in r.get("metrics", {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                row["values"].setdefault(key, []).append(float(value))
    for row in out.values():
        row["stats"] = {k: _stats(v) for k, v in row.pop("values").items()}
        row["seconds"] = statistics.fmean(row["seconds"]) if row["seconds"] else None
    return list(out.values())


def format_table(
    summary: list[dict], columns=DEFAULT_COLUMNS, reference: dict | None = None
) -> str:
    """Markdown table of the summary rows: a metric column per key of `columns` that some row
    has, mean ± std over seeds; `reference` = {title, values: {variant: text}} adds the
    paper's column; then seeds, steps, mean time per run and status. A variant marked ↓
    reconstructs below bicubic at its own rate in every seed (`eval/beats_rate`)."""
    keys = [k for k in columns if any(k in r.get("stats", {}) for r in summary)]
    head = ["variant", "quantizer", *(METRICS.get(k, (k, ""))[0] for k in keys)]
    ref = (reference or {}).get("values") or {}
    if ref:
        head.append(reference.get("title", "paper"))
    head += ["seeds", "steps", "time s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in summary:
        stats = r.get("stats", {})
        below = stats.get("eval/beats_rate", {}).get("max", 1.0) < 1.0  # no seed beats it
        cells = [f"{r['variant']} ↓" if below else r["variant"], r.get("quantizer", "")]
        cells += [_stat_cell(stats.get(k), METRICS.get(k, (k, "{:.4g}"))[1]) for k in keys]
        if ref:
            cells.append(str(ref.get(r["variant"], "—")))
        cells.append(str(len(r.get("seeds", []))))
        cells.append(_cell(r.get("steps"), "{:d}"))
        cells.append(_cell(r.get("seconds"), "{:.0f}"))
        errors = r.get("errors", [])
        cells.append(
            "ok" if not errors else f"failed ×{len(errors)}: " + errors[0].replace("|", "/")
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def recipe_of(config: dict, **placeholders: str) -> str:
    """A run's config fingerprint (12 hex digits): the config without `run` and the seed,
    each placeholder's path written as its name (`{study}`, `{data}`) so that the same recipe
    in another storage folder has the same print."""
    plain = {k: v for k, v in config.items() if k != "run"}
    plain["train"] = {k: v for k, v in plain.get("train", {}).items() if k != "seed"}
    text = json.dumps(plain, sort_keys=True, default=str)
    for name, path in placeholders.items():
        text = text.replace(str(path), "{" + name + "}")
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def merge_runs(earlier: dict | None, runs: list[dict], recipes: dict[str, str],
               scale: str) -> tuple[list[dict], list[str]]:  # fmt: skip
    """This run's rows with an earlier results.json's rows of the variants not run now, so a
    study can be run in parts (`vqtok ablate --variants`). An earlier row is kept only when
    its variant is still in the study (`recipes`: variant -> the fingerprint it has now) with
    the same recipe, at the same scale. Returns (rows in the study's variant order, the
    variants kept)."""
    if not earlier or earlier.get("scale") != scale:
        return runs, []
    now = {r["variant"] for r in runs}
    kept = [{**r, "git": r.get("git") or earlier.get("git")} for r in earlier.get("runs", [])
            if r["variant"] not in now and r.get("recipe") == recipes.get(r["variant"])]  # fmt: skip
    if not kept:
        return runs, []
    order = list(recipes)
    merged = sorted([*kept, *runs], key=lambda r: order.index(r["variant"]))  # stable
    return merged, [v for v in order if any(r["variant"] == v for r in kept)]


def check_ordering(summary: list[dict], better: str, worse: str, metric: str,
                   higher_is_better: bool = True) -> dict:  # fmt: skip
    """The verdict on one paper ordering "`better` beats `worse` on `metric`" (module doc)."""
    rows = {r["variant"]: r for r in summary}
    b = rows.get(better, {}).get("stats", {}).get(metric)
    w = rows.get(worse, {}).get("stats", {}).get(metric)
    out = {"better": better, "worse": worse, "metric": metric,
           "higher_is_better": bool(higher_is_better), "verdict": "not run"}  # fmt: skip
    if not b or not w:
        return out
    sign = 1.0 if higher_is_better else -1.0
    gap = sign * (b["mean"] - w["mean"])  # > 0: ours points the paper's way
    spread = max(b["max"] - b["min"], w["max"] - w["min"])
    if higher_is_better:
        agree, reverse = b["min"] > w["max"], b["max"] < w["min"]
    else:
        agree, reverse = b["max"] < w["min"], b["min"] > w["max"]
    few = min(b["n"], w["n"]) < 2
    verdict = "inconclusive" if few else "yes" if agree else "no" if reverse else "inconclusive"
    direction = "agrees" if gap > 0 else "disagrees" if gap < 0 else "tie"
    return {**out, "better_mean": b["mean"], "worse_mean": w["mean"], "gap": gap,
            "spread": spread, "n": min(b["n"], w["n"]), "direction": direction,
            "verdict": verdict}  # fmt: skip


def check_orderings(summary: list[dict], orderings: list) -> list[dict]:
    """`orderings`: `[better, worse, metric, higher_is_better]` lists (the last optional)."""
    return [check_ordering(summary, *o) for o in orderings]


def format_orderings(checks: list[dict]) -> str:
    """Markdown table of the verdicts: the paper's ordering, our means, gap, spread."""
    if not checks:
        return ""
    lines = ["| paper: better > worse | metric | ours: better | ours: worse | gap | spread "
             "| direction | reproduced? |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in checks:
        title, fmt = METRICS.get(c["metric"], (c["metric"], "{:.4g}"))
        arrow = "↑" if c["higher_is_better"] else "↓"
        cells = [f"{c['better']} > {c['worse']}", f"{title} {arrow}",
                 _cell(c.get("better_mean"), fmt), _cell(c.get("worse_mean"), fmt),
                 _cell(c.get("gap"), fmt), _cell(c.get("spread"), fmt),
                 c.get("direction", "—"), c["verdict"]]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_runs(runs: list[dict], columns=DEFAULT_COLUMNS) -> str:
    """Every run (variant × seed) with its own numbers: the detail behind the spread."""
    keys = [k for k in columns if any(k in r.get("metrics", {}) for r in runs)]
    head = ["run", *(METRICS.get(k, (k, ""))[0] for k in keys), "time s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in runs:
        m = r.get("metrics", {})
        cells = [f"{r['variant']} seed={r.get('seed')}"]
        cells += [_cell(m.get(k), METRICS.get(k, (k, "{:.4g}"))[1]) for k in keys]
        cells.append(_cell(r.get("seconds"), "{:.0f}"))
        cells.append("ok" if not r.get("error") else "failed: " + r["error"].replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_results(result: dict) -> str:
    """A study's results.md (also its section body in docs/RESULTS.md): the table, the
    orderings with verdicts, the run details, the data sizes, device and command."""
    columns = shown_columns(result.get("columns", DEFAULT_COLUMNS))
    parts = [format_table(result["summary"], columns, result.get("reference"))]
    if result.get("orderings"):
        parts += ["\nThe paper's orderings (reproduced = every seed of the better variant beats "
                  "every seed of the worse one; `inconclusive` with one seed):\n\n",
                  format_orderings(result["orderings"])]  # fmt: skip
    for name, row in (result.get("models") or {}).items():  # trained before the variants
        scores = ", ".join(f"{METRICS[k][0]} {METRICS[k][1].format(v)}"
                           for k, v in row.get("metrics", {}).items()
                           if k in ("eval/psnr", "eval/ssim", "eval/reference_rate_psnr"))  # fmt: skip
        parts.append(f"\nThe study's model `{name}` ({row.get('quantizer', '')}; "
                     f"`{Path(row['run']).name}`): {scores}.\n")  # fmt: skip
    if any(r.get("seed") is not None for r in result.get("runs", [])):
        parts += ["\n<details><summary>every run</summary>\n\n",
                  format_runs(result["runs"], columns),
                  "\n</details>\n"]  # fmt: skip
    meta = [("scale", result.get("scale")), ("seeds", result.get("seeds")),
            ("device", result.get("device")), ("command", result.get("command")),
            ("git", result.get("git")), ("data", _data_line(result.get("data")))]  # fmt: skip
    parts.append("\n" + "".join(f"- {k}: `{v}`\n" if k == "command" else f"- {k}: {v}\n"
                                for k, v in meta if v))  # fmt: skip
    return "".join(parts)


def _data_line(sizes: dict | None) -> str:
    if not sizes:
        return ""
    return "; ".join(
        f"{split} {s['sources']} sources, {s['samples']} samples ({s['images']} images, "
        f"{s['videos']} clips, {s['frames']} frames, {s['MB']} MB)"
        for split, s in sizes.items()
    )


# --- provenance: what results.json records beside the numbers ----------------------------


def device_description(cfg: Any) -> str:
    """What the runs ran on (`cfg`, a run Config): GPU name × workers, or the CPU model and
    its cores."""
    import torch

    if cfg.scaling.use_gpu and torch.cuda.is_available():
        return f"{cfg.scaling.num_workers} × {torch.cuda.get_device_name(0)}"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU, {os.cpu_count()} cores ({model or 'unknown model'}), torch {torch.__version__}"


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).parent)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
