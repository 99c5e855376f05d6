"""MLflow tracking for vqtok runs, with a local journal so that a dead server loses nothing.

    with Tracker(run_dir, experiment="vqtok") as tr:   # rank 0, eval, tune, tokenize
        tr.start("looc-debug", params=config)           # flattened params + config.yaml
        tr.log_metrics({"loss": 0.31, "lr": 1e-4}, step=100)
        tr.log_image(grid_chw, "recon", step=100)       # artifact recon/step_000100.png
        tr.log_codebook(export_dir, step=100)           # codebook/step_000100/ + usage_hist.png

Store: `tracking_uri`, else `MLFLOW_TRACKING_URI`, else a local SQLite store inside the run
directory (`mlflow/mlflow.db`, artifacts in `mlflow/artifacts`). Every call is first
appended to a journal in the run directory (`metrics.jsonl`, `tracking/events.jsonl`; files
the tracker writes go to `tracking/files/`), then delivered in order (`tracking_journal`).
If the store fails (server down, timeout, 5xx), training goes on: one warning per outage
names the URI and the error, later failures are only counted (`Tracker.stats`), and the
next attempt waits `retry_min_s`, doubling up to `retry_max_s`; the first attempt that
succeeds sends the backlog. `sync_journal(run_dir, uri)` does the same from another process
(after a crash, or to copy a run to another server). One live Tracker per run directory (a
file lock enforces it); not thread-safe. Not here yet: `log_model` (the exported model is a
plain `log_artifact` for now).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.tracking.journal import Journal, short_error
from pipelines.tracking.media import save_png, usage_plot
from pipelines.tracking.server import start_mlflow_server, stop_mlflow_server

try:
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH
except ImportError:  # pragma: no cover - other mlflow versions
    MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH = 250, 6000

__all__ = [
    "Tracker", "sync_journal", "flatten_params", "start_mlflow_server", "stop_mlflow_server",
]  # fmt: skip

log = logging.getLogger("vqtok.tracking")
STATUSES = ("FINISHED", "FAILED", "KILLED")
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_SAFE_REL = re.compile(r"^[\w.\-]+(/[\w.\-]+)*$")


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.quantizer.codebook_size": "512", ...}.

    Lists and empty dicts become JSON, other non-strings JSON scalars; keys are made valid
    MLflow names and values cut to MLflow's param length limit (6000 in 3.17).
    """
    out: dict[str, str] = {}
    for key, value in _plain(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, name + "."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
        out[clean_key(name)] = text
    return out


def clean_key(name: str) -> str:
    """A valid MLflow param/metric/tag name: bad characters -> '_', at most 250 chars."""
    key = _BAD_KEY_CHARS.sub("_", str(name))[:MAX_ENTITY_KEY_LENGTH]
    if posixpath.normpath(key) != key or key.startswith((".", "/")):
        key = ("_" + key.replace("/", "_"))[:MAX_ENTITY_KEY_LENGTH]
    return key or "_"


def sync_journal(run_dir: str | Path, tracking_uri: str | None = None) -> int:
    """Send every journal entry of `run_dir` that `tracking_uri` has not received yet.

    Default URI: the last one a Tracker started with in this run directory. Creates the run
    there if needed. Returns the number of journal lines sent (0 when up to date); raises if
    the store fails, or if a live Tracker holds the run directory.
    """
    if tracking_uri is None:
        state_path = Path(run_dir) / "tracking" / "sync.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        tracking_uri = state.get("last_uri")
    return Tracker(run_dir, tracking_uri).sync()


def run_store_uri(run_dir: str | Path) -> str:
    """A run folder's own MLflow store (`<run_dir>/mlflow/mlflow.db`): where a run logs
    when neither `run.tracking_uri` nor MLFLOW_TRACKING_URI names another."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow' / 'mlflow.db'}"


class Tracker:
    """The MLflow run of one run directory; no call raises because the store failed."""

    def __init__(
        self,
        run_dir: str | Path,
        tracking_uri: str | None = None,
        experiment: str = "vqtok",
        *,
        artifact_location: str | None = None,
        retry_min_s: float = 2.0,
        retry_max_s: float = 60.0,
        http_timeout_s: int = 5,
        stepped_images: bool = True,
        max_batches_per_call: int = 20,
        flush_interval_s: float = 0.0,
    ):
        """`artifact_location`: for a new experiment (default store: `<run_dir>/mlflow/
        artifacts`; a server picks its own). `http_timeout_s`: default for MLflow's HTTP
        timeout, with no HTTP retries (the journal retries), unless the environment sets
        them. `stepped_images`: also `log_image(key, step)` for MLflow's image-per-step
        view. `max_batches_per_call`: backlog batches (1000 metrics) sent per logging call.
        `flush_interval_s`: send at most this often (0: every call; `end` always sends);
        each send costs one HTTP round trip (~10-60 ms on 2 busy cores).
        """
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        default = run_store_uri(self.run_dir)
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default
        if self.tracking_uri == default:
            (self.run_dir / "mlflow").mkdir(exist_ok=True)
            artifact_location = artifact_location or str(self.run_dir / "mlflow" / "artifacts")
        elif self.tracking_uri.startswith("sqlite:///") and artifact_location is None:
            # a shared SQLite store (a tune study, an ablation): artifacts beside the database,
            # not in MLflow's default ./mlruns of whatever folder the process runs in
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            artifact_location = str(db.parent / "artifacts")
        if self.tracking_uri.startswith(("http://", "https://")):
            # A dead server should cost seconds, not MLflow's default 7 retries x 120 s.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(http_timeout_s)))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        self.experiment = experiment
        self.journal = Journal(
            self.run_dir, self.tracking_uri, experiment, artifact_location,
            retry_min_s, retry_max_s, stepped_images, max_batches_per_call, flush_interval_s,
        )  # fmt: skip
        self.stats = self.journal.stats  # failed, deferred, dropped, outages, delivered, skipped
        self.stats.update(skipped=0, local_errors=0)
        self._files = self.run_dir / "tracking" / "files"
        self._started = self._ended = False

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None until the store has been reached once."""
        return self.journal.run_id

    # --- public API -------------------------------------------------------------------

    def start(
        self,
        run_name: str,
        params: Any = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        nested: bool = False,
        run_id: str | None = None,
    ) -> str | None:
        """Open (or resume) the run; log the flattened config as params and as YAML.

        Resumes the run recorded in the run directory (or `run_id`). `nested=True` without
        `parent_run_id` nests under the active fluent MLflow run. Returns the run id, or None
        while the store is unreachable (the run is created when it comes back).
        """
        if self._started and not self._ended:
            raise RuntimeError("Tracker.start() called twice; end() the run first")
        if nested and parent_run_id is None:
            import mlflow

            active = mlflow.active_run()
            if active is None:
                raise ValueError("nested=True needs parent_run_id or an active MLflow run")
            parent_run_id = active.info.run_id
        self.journal.acquire()
        self.journal.mark_last_uri()  # what `sync_journal(run_dir)` syncs to by default
        config = _plain(params or {})
        starts = sum(1 for r, _ in self.journal.read("events") if r and r.get("op") == "start")
        cfg_file = self._files / ("config.yaml" if not starts else f"config.resume-{starts}.yaml")
        with self._local(cfg_file):
            cfg_file.parent.mkdir(parents=True, exist_ok=True)
            cfg_file.write_text(yaml.safe_dump(config, sort_keys=False))
        all_tags = {"vqtok.run_dir": str(self.run_dir)}
        all_tags.update({clean_key(k): str(v) for k, v in (tags or {}).items()})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self._started, self._ended = True, False
        self.journal.live = True
        self._event(
            "start", force=True, run_name=run_name, run_id=run_id, experiment=self.experiment,
            params=flatten_params(config), tags=all_tags, file=self._rel(cfg_file),
        )  # fmt: skip
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars (numbers, numpy or 0-d torch values) at `step`; others are skipped."""
        values = {}
        for key, value in metrics.items():
            try:
                value = value.item() if hasattr(value, "item") else value
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise TypeError(type(value).__name__)
            except (TypeError, ValueError, RuntimeError) as e:
                if not self.stats["skipped"]:
                    log.warning(
                        "log_metrics: skipping non-scalar %r (%s); more are counted", key, e
                    )
                self.stats["skipped"] += 1
                continue
            values[clean_key(key)] = float(value)
        if values:
            self._record("metrics", {"step": int(step), "ts": _now_ms(), "metrics": values})

    def log_image(self, image: Any, name: str = "recon", step: int = 0) -> Path:
        """Log an HWC uint8 / CHW float [0, 1] image as `<name>/step_<step>.png` (and as a
        stepped MLflow image when supported). Returns the local PNG path."""
        path = self._files / _safe_rel(name) / f"step_{int(step):06d}.png"
        with self._local(path):
            save_png(image, path)
            self._event("image", file=self._rel(path), artifact_path=name, key=name, step=int(step))
        return path

    def log_dict(self, data: Any, artifact_file: str) -> Path:
        """Log `data` as a JSON (or YAML, by suffix) artifact, e.g. `eval/metrics.json`."""
        path = self._files / _safe_rel(artifact_file)
        with self._local(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix in (".yaml", ".yml"):
                path.write_text(yaml.safe_dump(_plain(data), sort_keys=False))
            else:
                path.write_text(json.dumps(_plain(data), indent=1))
            self.log_artifact(path, posixpath.dirname(artifact_file) or None)
        return path

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or directory (uploaded when delivered: keep it in place until then)."""
        self._event("artifact", file=self._rel(Path(path)), artifact_path=artifact_path)

    def log_model(self, path: str | Path, name: str = "tokenizer", artifact_path: str = "model",
                  step: int = 0, tags: Mapping[str, str] | None = None) -> None:  # fmt: skip
        """Log an MLflow model folder (`pipelines.store.models.export_model`) as MLflow 3's
        logged model `name` of this run (listed under "Logged models", loadable as
        `models:/<model_id>`, the run's tag `vqtok.model_id`, registrable) and as the run's
        artifact `<artifact_path>/` (`runs:/<run_id>/<artifact_path>` loads it too). The two
        names differ on purpose: MLflow 3.17 resolves a run path named like one of the run's
        logged models through the default store, not the client's. Uploaded when delivered."""
        self._event("model", file=self._rel(Path(path)), name=name, artifact_path=artifact_path,
                    step=int(step), tags=dict(tags or {}))  # fmt: skip

    def log_codebook(
        self, source: str | Path | Iterable[str | Path], step: int, name: str = "codebook"
    ) -> Path:
        """Log a quantizer's `export_codebook(dir)` output (a dir or its files) under
        `<name>/step_<step>/`, with a usage histogram `usage_hist.png`. Returns the copy."""
        sources = [Path(source)] if isinstance(source, str | Path) else [Path(p) for p in source]
        if len(sources) == 1 and sources[0].is_dir():
            sources = sorted(p for p in sources[0].iterdir() if p.is_file())
        dest = self._files / _safe_rel(name) / f"step_{int(step):06d}"
        with self._local(dest):
            dest.mkdir(parents=True, exist_ok=True)
            for src in sources:
                shutil.copy2(src, dest / src.name)
            if (dest / "codebook.json").exists():
                try:
                    usage_plot(dest / "codebook.json", dest / "usage_hist.png", f"{name} @ {step}")
                except Exception as e:  # a plot must never stop training
                    log.warning("codebook usage plot failed: %s", short_error(e))
            self.log_artifact(dest, f"{name}/step_{int(step):06d}")
        return dest

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._event("tags", tags={clean_key(k): str(v) for k, v in tags.items()})

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with FINISHED, FAILED or KILLED; tries the store once more."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self._started and not self._ended:
            self._event("end", force=True, status=status)
            self._ended = True
        self.close()

    def sync(self) -> int:
        """Send every pending journal line now; returns how many. Raises if the store fails."""
        held = self.journal.locked
        self.journal.acquire()
        try:
            return self.journal.sync()
        finally:
            if not held:
                self.journal.close()

    def close(self) -> None:
        """Release the run directory without ending the run (see `end`)."""
        self.journal.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _record(self, kind: str, rec: dict, force: bool = False) -> None:
        if not self._started or self._ended:
            raise RuntimeError("Tracker: call start() before logging, and do not log after end()")
        self.journal.append(kind, rec, force)

    def _event(self, op: str, force: bool = False, **fields: Any) -> None:
        self._record("events", {"op": op, "ts": _now_ms(), **fields}, force)

    @contextmanager
    def _local(self, path: Path) -> Iterator[None]:
        """A local file the tracker cannot write (disk full, ...) is skipped, not fatal."""
        try:
            yield
        except OSError as e:
            if not self.stats["local_errors"]:
                log.warning("tracking: cannot write %s (%s); skipped", path, short_error(e))
            self.stats["local_errors"] += 1

    def _rel(self, path: Path) -> str:
        """Path as journalled: relative to the run directory when inside it."""
        path = Path(path).resolve()
        inside = path.is_relative_to(self.run_dir)
        return str(path.relative_to(self.run_dir)) if inside else str(path)


def _plain(obj: Any) -> Any:
    """Config-like object -> JSON/YAML-safe dicts, lists and scalars."""
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    elif callable(getattr(obj, "to_dict", None)):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if callable(getattr(obj, "item", None)):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    return str(obj)


def _safe_rel(name: str) -> str:
    """An artifact name that stays inside the run directory."""
    if not _SAFE_REL.match(name) or ".." in name.split("/"):
        raise ValueError(f"artifact name must be a relative path of [A-Za-z0-9_.-], got {name!r}")
    return name


def _now_ms() -> int:
    return int(time.time() * 1000)
