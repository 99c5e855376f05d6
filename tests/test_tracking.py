"""Tracker against real MLflow stores: SQLite in the run directory, and a real server that is
killed mid-run (slow)."""

import logging
import os
import signal
import time

import pytest
import torch
from mlflow import MlflowClient

from pipelines.tracking.tracker import (
    Tracker,
    flatten_params,
    start_mlflow_server,
    stop_mlflow_server,
    sync_journal,
)
from vqcore.quantizers import build

CONFIG = {
    "model": {"dim": 8, "quantizer": {"type": "vq", "codebook_size": 8, "levels": [4, 2]}},
    "optim": {"lr": 1e-4, "betas": [0.9, 0.95], "extra": {}},
    "note": "x" * 7000,
}


def _export_codebook(directory):
    q = build({"type": "vq", "dim": 4, "codebook_size": 8})
    q(torch.randn(2, 4, 3, 3))
    return q.export_codebook(directory)


def _artifacts(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def _steps(client, run_id, key="loss"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _warnings(caplog):
    return [
        r for r in caplog.records if r.name == "vqtok.tracking" and r.levelno >= logging.WARNING
    ]


def test_flatten_params():
    flat = flatten_params(CONFIG)
    assert flat["model.quantizer.codebook_size"] == "8"
    assert flat["model.quantizer.levels"] == "[4, 2]"
    assert flat["optim.betas"] == "[0.9, 0.95]" and flat["optim.extra"] == "{}"
    assert len(flat["note"]) == 6000 and flat["note"].endswith("...")
    assert set(flatten_params({"a b/c": {"x:y": 1, "bad*key": 2}})) == {
        "a b/c.x:y",
        "a b/c.bad_key",
    }


def test_local_store_roundtrip_resume_and_sync(tmp_path):
    run_dir = tmp_path / "run"
    _export_codebook(tmp_path / "cb")
    tracker = Tracker(run_dir, experiment="vqtok-test")
    run_id = tracker.start("tiny", CONFIG, tags={"job": "test"})
    assert run_id and (run_dir / "mlflow_run_id").read_text().strip() == run_id
    with pytest.raises(RuntimeError, match="in use"):
        Tracker(run_dir).start("tiny", CONFIG)  # one live Tracker per run directory
    for step in range(5):
        tracker.log_metrics({"loss": torch.tensor(1.0 / (step + 1)), "lr": 1e-4}, step=step)
    tracker.log_image(torch.rand(3, 12, 20), "recon", step=3)
    tracker.log_codebook(tmp_path / "cb", step=4)
    tracker.log_dict({"psnr": 21.5}, "eval/metrics.json")
    tracker.end()

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(run_id)
    # a model-training experiment, not MLflow 3's GenAI layout (issue 22 item 2)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert run.info.status == "FINISHED" and run.data.tags["job"] == "test"
    assert run.data.params["model.quantizer.levels"] == "[4, 2]"
    assert run.data.params["optim.lr"] == "0.0001"
    assert _steps(client, run_id) == [0, 1, 2, 3, 4]
    assert client.get_metric_history(run_id, "loss")[1].value == pytest.approx(0.5)
    files = _artifacts(client, run_id)
    for name in ("config.yaml", "recon/step_000003.png", "eval/metrics.json",
                 "codebook/step_000004/codebook.pt", "codebook/step_000004/codebook.json",
                 "codebook/step_000004/usage_hist.png"):  # fmt: skip
        assert name in files, (name, files)
    assert run_dir.joinpath("tracking/files/codebook/step_000004/usage_hist.png").stat().st_size
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 5
    assert tracker.stats["failed"] == 0 and tracker.stats["dropped"] == 0

    # Resume: a second Tracker on the run directory continues the same run.
    again = Tracker(run_dir, experiment="vqtok-test")
    assert again.start("tiny", {**CONFIG, "optim": {"lr": 2e-4}}) == run_id
    again.log_metrics({"loss": 0.1}, step=5)
    again.end()
    assert _steps(client, run_id) == list(range(6))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "config.resume-1.yaml" in _artifacts(client, run_id)

    # sync_journal copies the whole journal into another store, once; a torn line is skipped.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "ts": ')
    other = f"sqlite:///{tmp_path / 'copy.db'}"
    assert sync_journal(run_dir, other) > 0
    assert sync_journal(run_dir, other) == 0
    copy = MlflowClient(other)
    (copied,) = copy.search_runs([copy.get_experiment_by_name("vqtok-test").experiment_id])
    assert _steps(copy, copied.info.run_id) == list(range(6))
    assert copied.data.params == client.get_run(run_id).data.params
    assert copied.info.status == "FINISHED"


@pytest.mark.slow
def test_server_down_mid_run(tmp_path, caplog, monkeypatch):
    """Hung server (SIGSTOP), then a crashed one (SIGKILL) restarted on the same port."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    backend, artifacts = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "mlartifacts"
    proc, url = start_mlflow_server(backend, artifacts)
    client, run_dir = MlflowClient(url), tmp_path / "run"
    tracker = Tracker(run_dir, url, experiment="vqtok-test", retry_min_s=0.5, retry_max_s=1.0)

    def log_steps(steps, sleep=0.0):
        slowest = 0.0
        for step in steps:
            t0 = time.monotonic()
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            if step == 7:
                tracker.log_image(torch.rand(3, 8, 8), "recon", step=step)
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(sleep)  # let some calls fall past the retry interval and really retry
        return slowest

    try:
        run_id = tracker.start("tiny", CONFIG)
        log_steps(range(5))

        os.killpg(proc.pid, signal.SIGSTOP)  # hung: requests time out
        caplog.clear()
        assert log_steps(range(5, 9), sleep=0.4) < 5.0
        assert len(_warnings(caplog)) == 1 and url in _warnings(caplog)[0].getMessage()
        assert tracker.stats["failed"] >= 2 and tracker.stats["outages"] == 1
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 9
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(1.1)  # past the retry interval: logging resumes, the backlog goes first
        log_steps(range(9, 10))
        assert _steps(client, run_id) == list(range(10))
        assert "recon/step_000007.png" in _artifacts(client, run_id)

        stop_mlflow_server(proc, kill=True)  # crashed: connections refused
        caplog.clear()
        assert log_steps(range(10, 15), sleep=0.3) < 5.0
        assert len(_warnings(caplog)) == 1 and tracker.stats["outages"] == 2
        tracker.close()  # the training process is gone; its journal stays

        proc, _ = start_mlflow_server(backend, artifacts, port=int(url.rsplit(":", 1)[1]))
        assert sync_journal(run_dir) == 5
        assert sync_journal(run_dir) == 0
        assert _steps(client, run_id) == list(range(15))  # each step exactly once

        resumed = Tracker(run_dir, url, experiment="vqtok-test")
        assert resumed.start("tiny", CONFIG) == run_id
        resumed.log_metrics({"loss": 0.01}, step=15)
        resumed.end()
        assert _steps(client, run_id) == list(range(16))
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        tracker.close()
        stop_mlflow_server(proc)
