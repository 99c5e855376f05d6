"""Which checkpoint a run resumes from: the newest that passes vqtok's own check (every
file against its rank's manifest, size and sha256: `store.checkpoint.check_loadable`), the
same choice on the driver and on every worker, with Ray's record brought in line.

Ray Train V2 restores the checkpoint its snapshot (`checkpoint_manager_snapshot.json` in
the run folder) registered last, and refuses to start when a registered folder is gone. So
before a Ray run starts, `reconcile` drops from that record every checkpoint that fails
its check and moves a damaged folder aside (`corrupt-step_N`, kept for a look, never
loaded); the workers then restore what Ray hands them, the newest registered checkpoint
that verifies, and the driver builds the data from the same one (`resume_checkpoint`).
Without Ray (`--local`), `newest_sound` makes the same choice.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.store import checkpoint as ckpt

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of its checkpoints


def _say(text: str) -> None:
    print(f"[vqtok] {text}", file=sys.stderr)


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint folder out of the `step_*` namespace (nothing deleted)."""
    target, n = path.with_name(f"corrupt-{path.name}"), 1
    while target.exists():
        target, n = path.with_name(f"corrupt-{path.name}.{n}"), n + 1
    path.rename(target)
    return target


def newest_sound(root: Path) -> Path | None:
    """The newest `step_N` under root that passes `check_loadable`; each newer one that
    fails is named with its reason and set aside."""
    for path in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
        try:
            ckpt.check_loadable(path)
        except ckpt.CheckpointError as exc:
            _say(f"passing over {path.name}: {exc}; set aside as {set_aside(path).name}")
            continue
        return path
    return None


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
        _say(f"warning: cannot read {snap} ({exc!r}); using the newest checkpoint")
        return ckpt.latest(run_dir)


def reconcile(run_dir: Path) -> Path | None:
    """Before a Ray run: check every checkpoint Ray registered, drop those that fail (set
    aside when present) from Ray's record, and return the one the run resumes from. A run
    folder with checkpoints but no Ray record (written by `--local`) is refused: Ray would
    start over on top of them."""
    snap = run_dir / RAY_SNAPSHOT
    if not snap.is_file():
        if ckpt.latest(run_dir) is not None:
            raise ConfigError(
                f"run.name: {run_dir} has checkpoints Ray has no record of (written with "
                "--local, or by a Ray run stopped before its first record), so Ray would start "
                "over on top of them: resume them with --local, or give a new run.name"
            )
        return None
    try:
        record = json.loads(snap.read_text())
        results = record["checkpoint_results"]
        indices = record["checkpoint_report_indices"]
        names = [r["checkpoint_dir_name"] for r in results]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _say(f"warning: cannot read {snap} ({exc!r}); leaving Ray's record as it is")
        return resume_checkpoint(run_dir)
    bad: dict[str, str] = {}
    for name in names:
        try:
            ckpt.check_loadable(run_dir / name)
        except ckpt.CheckpointError as exc:
            bad[name] = str(exc)
    if not bad:
        return resume_checkpoint(run_dir)
    keep = [i for i, name in enumerate(names) if name not in bad]
    record["checkpoint_results"] = [results[i] for i in keep]
    record["checkpoint_report_indices"] = [indices[i] for i in keep]
    newest = max(keep, key=lambda i: indices[i], default=None)
    record["latest_checkpoint_result"] = None if newest is None else results[newest]
    pending = [(r, s) for r, s in zip(record.get("pending_training_results", []),
                                      record.get("pending_validation_specs", []))
               if r["checkpoint_dir_name"] not in bad]  # fmt: skip
    record["pending_training_results"] = [r for r, _ in pending]
    record["pending_validation_specs"] = [s for _, s in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):  # fmt: skip
        if key in record:
            record[key] = [n for n in record[key] if n not in bad]
    tmp = snap.with_name(f".{snap.name}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, snap)
    for name, why in sorted(bad.items()):
        moved = f"; set aside as {set_aside(run_dir / name).name}" if (run_dir / name).is_dir() else ""
        _say(f"passing over {name}: {why}{moved}")
    chosen = None if newest is None else run_dir / names[newest]
    _say(f"Ray's record of checkpoints updated: resuming from {chosen or 'the start'}")
    return chosen
