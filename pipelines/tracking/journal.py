"""The tracker's local journal and its in-order delivery to one MLflow store.

Files in the run directory:
  metrics.jsonl           one line per `log_metrics`: {"step", "ts" (ms), "metrics": {...}}
  tracking/events.jsonl   {"op": start | artifact | image | tags | end, "ts", ...}
  tracking/sync.json      per tracking URI: its run id and the byte offset up to which each
                          journal was delivered there; `last_uri` for `sync_journal`
  tracking/.lock          flock held by the one live writer
  mlflow_run_id           the run id (so a resumed training logs into the same run)
Lines are appended first, then everything past the delivered offset is sent in order
(events first; metrics logged before an `end` go before it). A failing store leaves the
offset where it is, so the next successful attempt (or `sync_journal`) sends the backlog.
Replays are idempotent: the offset only moves after delivery, and metrics are resent with
their journal timestamps, which the SQL stores de-duplicate.
"""

from __future__ import annotations

import fcntl
import inspect
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

log = logging.getLogger("vqtok.tracking")
KINDS = ("events", "metrics")
_REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"}
_STEPPED_IMAGES = "step" in inspect.signature(MlflowClient.log_image).parameters

# MLflow 3's UI opens an untyped experiment in its GenAI layout (traces, evaluation runs, an
# assistant panel): vqtok's experiments are model training (the UI's experimentKind enum)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


class Journal:
    """Append-then-deliver log of one run directory for one tracking URI."""

    def __init__(
        self,
        run_dir: Path,
        tracking_uri: str,
        experiment: str,
        artifact_location: str | None = None,
        retry_min_s: float = 2.0,
        retry_max_s: float = 60.0,
        stepped_images: bool = True,
        max_batches_per_call: int = 20,
        flush_interval_s: float = 0.0,
    ):
        self.run_dir, self.tracking_uri, self.experiment = run_dir, tracking_uri, experiment
        self.artifact_location = artifact_location
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self.stepped_images = stepped_images and _STEPPED_IMAGES
        self.max_batches_per_call, self.flush_interval_s = max_batches_per_call, flush_interval_s
        self.uri_key = re.sub(r"//[^/@]*@", "//", tracking_uri)  # no credentials on disk
        self.live = False  # a started Tracker: owns `mlflow_run_id`
        self.stats = dict(failed=0, deferred=0, dropped=0, outages=0, delivered=0)
        self._state_path = run_dir / "tracking" / "sync.json"
        self._client: MlflowClient | None = None
        self._lock: int | None = None
        self._state: dict[str, Any] = {}
        self._st: dict[str, Any] = {}
        self._down = False
        self._delay = self._retry_at = self._flush_at = 0.0
        self._exp_ids: dict[str, str] = {}

    @property
    def run_id(self) -> str | None:
        return self._st.get("run_id")

    @property
    def locked(self) -> bool:
        return self._lock is not None

    def path(self, kind: str) -> Path:
        return self.run_dir / ("metrics.jsonl" if kind == "metrics" else "tracking/events.jsonl")

    def acquire(self) -> None:
        """Take the run directory's lock and load the sync state."""
        if self._lock is not None:
            return
        lock_path = self.run_dir / "tracking" / ".lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"{self.run_dir} is in use by another Tracker (lock {lock_path}); end it first"
            ) from None
        self._lock = fd
        state = json.loads(self._state_path.read_text()) if self._state_path.exists() else {}
        self._state = {"last_uri": state.get("last_uri"), "uris": state.get("uris", {})}
        self._st = self._state["uris"].setdefault(
            self.uri_key, {"run_id": None, "events": 0, "metrics": 0}
        )
        for kind in KINDS:  # end a line torn by a crash, so that appends stay whole lines
            path = self.path(kind)
            if path.exists() and path.stat().st_size:
                with open(path, "rb+") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
        self._save_state()

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None

    def mark_last_uri(self) -> None:
        self._state["last_uri"] = self.uri_key
        self._save_state()

    def read(self, kind: str, offset: int = 0) -> Iterator[tuple[dict | None, int]]:
        """(record, or None if unreadable; end offset) per line from byte `offset`."""
        path = self.path(kind)
        if not path.exists():
            return
        offset = 0 if offset > path.stat().st_size else offset  # the journal was replaced
        with open(path, "rb") as f:
            f.seek(offset)
            for line in f:
                offset += len(line)
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                yield (rec if isinstance(rec, dict) else None), offset

    def append(self, kind: str, rec: dict, force: bool = False) -> None:
        """Journal `rec`, then deliver the backlog unless waiting out a failure (or `force`)."""
        try:
            with open(self.path(kind), "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            self._on_failure(e, where=f"journal {self.path(kind)}")
            return
        now = time.monotonic()
        if not force and now < max(self._retry_at, self._flush_at):
            self.stats["deferred"] += now < self._retry_at  # waiting out a failure
            return
        self._flush_at = now + self.flush_interval_s
        try:
            sent = self._flush(max_batches=None if force else self.max_batches_per_call)
        except Exception as e:
            self._on_failure(e)
            return
        self._recovered(sent)

    def sync(self) -> int:
        """Deliver every pending line now; returns how many. Raises if the store fails."""
        sent = self._flush(max_batches=None)
        self._recovered(sent)
        return sent

    # --- delivery ---------------------------------------------------------------------

    def _flush(self, max_batches: int | None) -> int:
        self._client = self._client or MlflowClient(self.tracking_uri)
        sent = 0
        for rec, offset in self.read("events", self._st["events"]):
            if rec is not None:
                if rec.get("op") == "end":
                    sent += self._flush_metrics(None)
                self._deliver(self._deliver_event, rec)
            self._st["events"] = offset
            self._save_state()
            sent += 1
        return sent + self._flush_metrics(max_batches)

    def _flush_metrics(self, max_batches: int | None) -> int:
        sent = batches = size = 0
        batch: list[list[Metric]] = []
        offset = self._st["metrics"]
        for rec, end in self.read("metrics", offset):
            metrics = self._metric_list(rec)
            if batch and size + len(metrics) > 1000:
                self._deliver_metrics(batch, offset)
                sent, batches, batch, size = sent + len(batch), batches + 1, [], 0
                if max_batches is not None and batches >= max_batches:
                    return sent
            batch.append(metrics)
            size, offset = size + len(metrics), end
        if batch:
            self._deliver_metrics(batch, offset)
        return sent + len(batch)

    def _deliver_metrics(self, batch: list[list[Metric]], offset: int) -> None:
        flat = [m for metrics in batch for m in metrics]
        if flat and not self._deliver(self._log_metrics, flat) and len(batch) > 1:
            for metrics in batch:  # rejected: drop only the bad lines
                self._deliver(self._log_metrics, metrics)
        self._st["metrics"] = offset
        self._save_state()

    def _metric_list(self, rec: dict | None) -> list[Metric]:
        """A metrics line as MLflow metrics; [] (and counted as dropped) if malformed."""
        try:
            ts, step = int(rec["ts"]), int(rec["step"])
            return [Metric(k, float(v), ts, step) for k, v in rec["metrics"].items()]
        except (KeyError, TypeError, ValueError, AttributeError):
            self.stats["dropped"] += 1
            return []

    def _log_metrics(self, metrics: list[Metric]) -> None:
        run_id = self._require_run()
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def _deliver(self, fn, arg) -> bool:
        """fn(arg); an entry the store rejects as invalid is dropped (False); else raise."""
        try:
            fn(arg)
            return True
        except Exception as e:
            bad_entry = isinstance(e, MlflowException) and e.error_code in _REJECTED
            local_bad = isinstance(e, FileNotFoundError | KeyError | ValueError | TypeError)
            if not (bad_entry or local_bad):
                raise
            if not self.stats["dropped"]:
                log.warning(
                    "MLflow at %s rejected a journal entry; dropped from delivery (kept in the "
                    "journal; later drops are only counted): %s",
                    self.uri_key,
                    short_error(e),
                )
            self.stats["dropped"] += 1
            return False

    def _deliver_event(self, rec: dict) -> None:
        op = rec.get("op")
        if op == "start":
            return self._deliver_start(rec)
        run_id, client = self._require_run(), self._client
        if op in ("artifact", "image"):
            path = self.run_dir / rec["file"]  # an absolute path stays absolute
            if not path.exists():
                raise FileNotFoundError(f"artifact {path} is gone")
            if path.is_dir():
                client.log_artifacts(run_id, str(path), rec.get("artifact_path"))
            else:
                client.log_artifact(run_id, str(path), rec.get("artifact_path"))
            if op == "image" and self.stepped_images:  # the UI's image-per-step view
                from PIL import Image

                with Image.open(path) as img:
                    client.log_image(
                        run_id, img.copy(), key=rec["key"], step=rec["step"],
                        timestamp=rec["ts"], synchronous=True,
                    )  # fmt: skip
        elif op == "model":
            self._deliver_model(run_id, rec)
        elif op == "tags":
            self._log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
        elif op == "end":
            client.set_terminated(run_id, rec["status"], end_time=rec["ts"])
        else:
            raise ValueError(f"unknown journal op {op!r}")

    def _deliver_model(self, run_id: str, rec: dict) -> None:
        """A logged model (MLflow 3) with the folder's files, linked to the run as its
        output, then the same files as the run's artifact `<artifact_path>/`."""
        from mlflow.entities import LoggedModelOutput

        path = self.run_dir / rec["file"]
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {path} is gone")
        client = self._client
        experiment_id = client.get_run(run_id).info.experiment_id
        model = client.create_logged_model(
            experiment_id, name=rec["name"], source_run_id=run_id, tags=rec.get("tags") or None,
            model_type="vqtok tokenizer",
        )  # fmt: skip
        client.log_model_artifacts(model.model_id, str(path))
        client.finalize_logged_model(model.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, rec.get("step", 0))])
        client.set_tag(run_id, "vqtok.model_id", model.model_id)
        client.log_artifacts(run_id, str(path), rec.get("artifact_path") or "model")

    def _deliver_start(self, rec: dict) -> None:
        """Create or resume the run, then log params not logged yet, tags and the config."""
        client, run = self._client, None
        run_id = rec.get("run_id") or self._st.get("run_id")
        run_id_file = self.run_dir / "mlflow_run_id"
        if not run_id and self.live and run_id_file.exists():  # resume, sync state lost
            run_id = run_id_file.read_text().strip() or None
        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("run %s not found at %s: starting a new run", run_id, self.uri_key)
        if run is None:
            run = client.create_run(
                self._experiment_id(rec.get("experiment") or self.experiment),
                start_time=rec["ts"], tags=rec["tags"], run_name=rec.get("run_name"),
            )  # fmt: skip
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            self._log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
        self._st["run_id"] = run_id = run.info.run_id
        self._save_state()
        if self.live or not run_id_file.exists():
            run_id_file.write_text(run_id + "\n")
        old, params = run.data.params, rec.get("params", {})
        changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
        if changed:
            log.warning(
                "run %s resumed with %d changed params (%s); MLflow keeps the first values, "
                "the new config is artifact %s",
                run_id, len(changed), ", ".join(changed[:5]), Path(rec["file"]).name,
            )  # fmt: skip
        self._log_batch(run_id, params=[Param(k, v) for k, v in params.items() if k not in old])
        if (self.run_dir / rec["file"]).exists():
            client.log_artifact(run_id, str(self.run_dir / rec["file"]))

    def _log_batch(self, run_id: str, params=(), tags=()) -> None:
        for i in range(0, max(len(params), len(tags)), 100):  # MLflow's per-batch limit
            self._client.log_batch(run_id, params=params[i : i + 100], tags=tags[i : i + 100])

    def _experiment_id(self, name: str) -> str:
        if name not in self._exp_ids:
            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                try:
                    exp_id = self._client.create_experiment(name, self.artifact_location,
                                                            tags=EXPERIMENT_TAGS)  # fmt: skip
                except MlflowException as e:  # created meanwhile by another process
                    if e.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp_id = self._client.get_experiment_by_name(name).experiment_id
            else:
                exp_id = exp.experiment_id
            self._exp_ids[name] = exp_id
        return self._exp_ids[name]

    def _require_run(self) -> str:
        if not self._st.get("run_id"):
            raise RuntimeError(f"no MLflow run at {self.uri_key} yet (start not delivered)")
        return self._st["run_id"]

    # --- outages ----------------------------------------------------------------------

    def _on_failure(self, e: BaseException, where: str | None = None) -> None:
        self.stats["failed"] += 1
        self._delay = min(max(self._delay * 2, self.retry_min_s), self.retry_max_s)
        self._retry_at = time.monotonic() + self._delay
        if not self._down:
            self._down = True
            self.stats["outages"] += 1
            log.warning(
                "MLflow tracking at %s failed (%s). Training goes on; entries are kept in %s "
                "and sent when it is back (next try in %.0f s, then at most every %.0f s). "
                "Further failures are only counted (Tracker.stats).",
                where or self.uri_key, short_error(e), self.run_dir, self._delay,
                self.retry_max_s,
            )  # fmt: skip

    def _recovered(self, sent: int) -> None:
        self.stats["delivered"] += sent
        if self._down:
            self._down, self._delay, self._retry_at = False, 0.0, 0.0
            log.warning(
                "MLflow tracking at %s is back: sent %d journal lines (%d failed attempts so far)",
                self.uri_key, sent, self.stats["failed"],
            )  # fmt: skip

    def _save_state(self) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=1))
        os.replace(tmp, self._state_path)


def short_error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
