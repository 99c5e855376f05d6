"""Short training runs of jobs/debug.yaml on the test shards, for the fault tests
(test_reliability_train.py, test_reliability_checkpoints.py): their overrides, config,
logged rows and the checkpoint Ray Train registered."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG_JOB = ROOT / "jobs" / "debug.yaml"


def overrides(shards, storage, name, *extra) -> list[str]:
    """key=value overrides: the test shards, the run folder `storage/name`, then `extra`."""
    return [
        f"data.shards={json.dumps(shards['train'])}",
        f"train.eval_shards={json.dumps(shards['val'])}",
        f"run.storage={storage}",
        f"run.name={name}",
        *extra,
    ]


def debug_config(shards, storage, name, *extra) -> Config:
    return load_config(DEBUG_JOB, overrides(shards, storage, name, *extra))


def rows(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict a line."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def registered(run_dir: Path) -> str | None:
    """The checkpoint Ray Train has registered last (what a restarted group restores)."""
    from pipelines.training.resume import RAY_SNAPSHOT

    try:
        latest = json.loads((run_dir / RAY_SNAPSHOT).read_text())["latest_checkpoint_result"]
        return latest["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
