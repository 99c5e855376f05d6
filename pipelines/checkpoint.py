"""Checkpoint folders: one per step, written atomically, last k kept, loaded with checks.

    <dir>/step_000100/
        gen/ disc/ ...        DeepSpeed engine states (weights, optimiser, scheduler), per phase
        ema.pt                EMA of the generator: AveragedModel state (`module.*` weights
                              and `n_averaged`), rank 0, `weights_only` loadable
        train_state.json      step, samples seen, data epoch, seeds, skipped-sample counts
        config.yaml           the resolved run config
        COMPLETE              written last: a folder without it is an interrupted write

Every rank writes its own engine shards into the same staging folder; rank 0 writes the rest.
Under Ray Train the staged folder is handed to `ray.train.report` (Ray uploads and keeps the
last k); in a plain process it is renamed into place here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file."""


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    micro_step: int = 0
    samples_seen: int = 0
    epoch: int = 0  # data passes started
    seed: int = 42
    skipped: dict[str, int] = field(default_factory=dict)  # data samples skipped, by reason
    nonfinite_steps: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_file(cls, path: Path) -> TrainState:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"unreadable train state {path}: {exc}") from exc


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def latest(root: Path) -> Path | None:
    """Newest complete checkpoint folder under root (interrupted writes are ignored)."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))
    return done[-1] if done else None


def write_rank0_files(path: Path, state: TrainState, ema: torch.nn.Module | None, config: dict):
    import yaml

    path.mkdir(parents=True, exist_ok=True)
    if ema is not None:
        torch.save({k: v.detach().cpu() for k, v in ema.state_dict().items()}, path / "ema.pt")
    (path / "train_state.json").write_text(state.to_json())
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def mark_complete(path: Path) -> None:
    (path / COMPLETE).write_text("ok\n")


def publish(staging: Path, root: Path, keep_last: int) -> Path:
    """Move a finished staging folder to root/step_N atomically, drop all but the last k."""
    mark_complete(staging)
    final = root / staging.name
    root.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    staging.replace(final)  # same filesystem: an atomic rename
    done = sorted(p for p in root.glob("step_*") if is_complete(p))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_ema(path: Path, ema: torch.nn.Module) -> None:
    f = path / "ema.pt"
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(f"corrupted or unreadable EMA weights {f}: {exc}") from exc
    missing, unexpected = ema.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{f}: keys do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def check_loadable(path: Path) -> dict[str, Any]:
    """Fail with a clear error naming the file if a checkpoint folder is incomplete."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    for name in ("train_state.json", "config.yaml"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    return {"state": TrainState.from_file(path / "train_state.json")}
