"""Checkpoint folders: one per step, written atomically, last k kept, loaded with checks.

    <dir>/step_000100/
        gen/ disc/ ...        DeepSpeed engine states (weights, optimiser, scheduler), per phase
        ema.pt                EMA of the generator: AveragedModel state (`module.*` weights
                              and `n_averaged`), rank 0, `weights_only` loadable
        train_state.json      step, samples seen, data epoch, seeds, skipped-sample counts
        config.yaml           the resolved run config
        manifest/rank_R.json  size and sha256 of every file rank R wrote (its last file)
        COMPLETE              rank 0's last file: {"world_size": W}

Every rank writes its own engine shards into a staging folder of its own, then its manifest;
rank 0 writes the rest. Under Ray Train each rank's folder is handed to `ray.train.report`,
which copies them into one `step_N` (in no particular order, file by file) and keeps the last
k; in a plain process the folder is renamed into place here.

A folder counts as a checkpoint only when COMPLETE is there, every rank's manifest is there
and every file they list has its recorded size (`is_complete`, stat calls only): a writer
killed half way, on any rank, leaves a folder that `latest` passes over. Loading checks
the sha256 of every file first (`check_loadable`), so a corrupted file is a `CheckpointError`
naming it, never a partial load. Folders from before manifests (COMPLETE reads "ok") are
not loaded.

Nothing in a checkpoint is unpickled as code: manifests check integrity, not intent (whoever
can plant a file can rewrite its manifest), so every file is read with
`torch.load(weights_only=True)`. DeepSpeed's own loader unpickles freely (0.19's
`TorchCheckpointEngine.load`: `weights_only=False`); `safe_engine_loading` makes an engine
read its states through `load_states` instead, which allows only the few plain classes its
ZeRO states hold (`DEEPSPEED_STATE_GLOBALS`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"
MANIFESTS = "manifest"
# What DeepSpeed 0.19's engine states pickle besides tensors and builtins (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-1/2/3 states, fp32 and bf16):
# plain data classes and an enum, rebuilt without running any of their code.
DEEPSPEED_STATE_GLOBALS = (
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


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
    nonfinite_steps: int = 0  # micro-steps skipped for a non-finite loss, in all
    nonfinite_streak: int = 0  # ... in a row, up to now
    batches_in_epoch: int = 0  # batches of `epoch` consumed: a resume skips as many
    last_keys: list[str] = field(default_factory=list)  # rank 0's last batch (resume check)

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
    """COMPLETE, every rank's manifest and every listed file at its recorded size."""
    try:
        _listed_files(path)
    except CheckpointError:
        return False
    return True


def latest(root: Path) -> Path | None:
    """Newest complete checkpoint folder under root. Newer folders that are not complete
    (an interrupted write, a truncated file) are passed over, each with a warning naming
    what is wrong."""
    if not root.is_dir():
        return None
    for p in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
        try:
            _listed_files(p)
        except CheckpointError as exc:
            print(f"[vqtok] passing over {p.name}: {exc}", file=sys.stderr)
            continue
        return p
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path, rank: int) -> Path:
    """Record size and sha256 of every file in this rank's staging folder (call after the
    rank wrote all of them; rank 0 then calls `mark_complete`)."""
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel == COMPLETE or rel.startswith(f"{MANIFESTS}/"):
            continue
        files[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    out = path / MANIFESTS / f"rank_{rank:05d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "files": files}, indent=1))
    tmp.replace(out)
    return out


def _listed_files(path: Path) -> dict[str, dict]:
    """Every file the manifests list, checked by size. Raises CheckpointError naming the
    first missing or short file (or a folder from before manifests)."""
    marker = path / COMPLETE
    if not marker.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: no {COMPLETE} marker (an interrupted write)"
        )
    text = marker.read_text().strip()
    if text == "ok":
        raise CheckpointError(
            f"checkpoint {path} was written before manifests (COMPLETE reads 'ok'): its files "
            "cannot be checked, so it is not loaded; resume from a newer one or start a new run"
        )
    try:
        world = int(json.loads(text)["world_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable marker {marker}: {text[:80]!r}") from exc
    files: dict[str, dict] = {}
    for rank in range(world):
        m = path / MANIFESTS / f"rank_{rank:05d}.json"
        try:
            files.update(json.loads(m.read_text())["files"])
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"checkpoint {path} is incomplete: manifest {m} of rank {rank} of {world} "
                f"is missing or unreadable ({type(exc).__name__})"
            ) from exc
    for rel, meta in files.items():
        f = path / rel
        try:
            size = f.stat().st_size
        except OSError:
            raise CheckpointError(f"checkpoint file missing: {f}") from None
        if size != meta["size"]:
            raise CheckpointError(
                f"checkpoint file {f} has {size} bytes, its manifest says {meta['size']} "
                "(truncated or overwritten)"
            )
    return files


def verify(path: Path) -> None:
    """Sizes and sha256 of every file against the manifests; CheckpointError naming the
    first file that differs. Reads the whole checkpoint once."""
    files = _listed_files(path)
    for rel, meta in files.items():
        f = path / rel
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint file {f} is corrupted: its sha256 differs from the manifest"
            )


def write_rank0_files(path: Path, state: TrainState, ema: torch.nn.Module | None, config: dict):
    import yaml

    path.mkdir(parents=True, exist_ok=True)
    if ema is not None:
        torch.save({k: v.detach().cpu() for k, v in ema.state_dict().items()}, path / "ema.pt")
    (path / "train_state.json").write_text(state.to_json())
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def mark_complete(path: Path, world_size: int = 1) -> None:
    """Rank 0's last file; the other ranks' manifests may still be on their way (Ray)."""
    (path / COMPLETE).write_text(json.dumps({"world_size": world_size}) + "\n")


def publish(staging: Path, root: Path, keep_last: int) -> Path:
    """Move a finished staging folder (manifest and marker written) to root/step_N
    atomically, drop all but the last k. A staging folder on another filesystem is copied
    beside the target first, then renamed."""
    if not (staging / COMPLETE).is_file():
        write_manifest(staging, 0)
        mark_complete(staging)
    final = root / staging.name
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{staging.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        os.rename(staging, tmp)
    except OSError:  # another filesystem (EXDEV): copy, then rename
        shutil.copytree(staging, tmp)
        shutil.rmtree(staging, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)  # same folder: an atomic rename
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


def load_states(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load(weights_only=True)` of a DeepSpeed state file, allowing only
    `DEEPSPEED_STATE_GLOBALS`: a file that needs anything else (a planted pickle that would
    run code) is a CheckpointError naming it, and nothing of it runs."""
    allowed = [getattr(importlib.import_module(m), n) for m, n in DEEPSPEED_STATE_GLOBALS]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError (not imported: tests scan for pickle)
        if type(exc).__name__ != "UnpicklingError":
            raise  # a damaged file: the caller names it
        why = next((ln.strip() for ln in str(exc).splitlines() if "global" in ln.lower()),
                   str(exc).splitlines()[-1] if str(exc) else type(exc).__name__)  # fmt: skip
        raise CheckpointError(f"refusing to load {path}: it holds more than weights ({why})"
                              ) from None  # fmt: skip


@functools.cache
def _weights_only_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with `load_states`."""

        def load(self, path: str, map_location=None):
            return load_states(path, map_location)

    return WeightsOnlyCheckpointEngine


def safe_engine_loading(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoints with `load_states` (its own loader
    unpickles anything). Only the torch engine, the one vqtok configures, is known."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed checkpoint engine {type(current).__name__}: vqtok "
                              "loads checkpoints only through the torch engine (weights only)")  # fmt: skip
    current.__class__ = _weights_only_engine_class()


def world_size(path: Path) -> int:
    """How many ranks wrote a complete checkpoint (its COMPLETE marker)."""
    return int(json.loads((path / COMPLETE).read_text())["world_size"])


def check_loadable(path: Path, world: int | None = None) -> dict[str, Any]:
    """Fail with a clear error naming the file if a checkpoint folder is incomplete or any
    file differs from its manifest (size, sha256), or (with `world`) if another number of
    ranks wrote it; returns {"state": TrainState}."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    for name in ("train_state.json", "config.yaml"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    verify(path)
    if world is not None and (written := world_size(path)) != world:
        raise CheckpointError(
            f"checkpoint {path} was written by {written} worker(s) and this run has {world}: "
            f"its optimizer states are split {written} ways. Resume with "
            f"scaling.num_workers={written}" + (" (without --local)" if written > 1 else "")
            + ", or give a new run.name"
        )
    return {"state": TrainState.from_file(path / "train_state.json")}
