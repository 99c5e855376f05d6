"""Start and stop a local MLflow tracking server (tests, a single-node cluster head).

    proc, url = start_mlflow_server("sqlite:////runs/mlflow.db", "/runs/mlartifacts")
    ...  # Tracker(run_dir, tracking_uri=url)
    stop_mlflow_server(proc)

Binds to 127.0.0.1 unless told otherwise; one worker and no job execution, which starts in
~6-9 s on 2 cores (docs/RUNTIME.md). Artifacts are proxied by the server (`mlflow-artifacts:/`),
so clients need no access to `artifact_root`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

__all__ = [
    "free_port", "server_argv", "start_mlflow_server", "stop_mlflow_server", "wait_healthy",
]  # fmt: skip


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `GET url/health` until it answers 200; RuntimeError on timeout or if `proc` exits."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"MLflow server exited with code {proc.returncode}{_log_tail(proc)}")
        try:
            with opener.open(f"{url}/health", timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(
        f"MLflow server at {url} not healthy after {timeout_s:.0f} s{_log_tail(proc)}"
    )


def server_argv(
    backend_uri: str, artifact_root: str, port: int, host: str = "127.0.0.1"
) -> list[str]:
    """The `mlflow server` command line: bound to `host` (loopback unless told otherwise),
    one worker, artifacts proxied from `artifact_root`."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifact_root),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def start_mlflow_server(
    backend_uri: str,
    artifact_root: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    log_path: str | Path | None = None,
    timeout_s: float = 60.0,
) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` and wait until it is healthy; returns (process, url).

    port 0 picks a free port. stdout/stderr go to `log_path` (default: next to a local
    `artifact_root`, else the temp dir). The server runs in its own process group, which
    `stop_mlflow_server` ends.
    """
    port = port or free_port(host)
    if log_path is None:
        root = Path(str(artifact_root))
        base = root.parent if "://" not in str(artifact_root) else Path(tempfile.gettempdir())
        log_path = base / f"mlflow-server-{port}.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if "://" not in str(artifact_root):
        Path(artifact_root).mkdir(parents=True, exist_ok=True)
        artifact_root = str(Path(artifact_root).resolve())
    cmd = server_argv(backend_uri, str(artifact_root), port, host)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    try:
        wait_healthy(url, timeout_s, proc)
    except BaseException:
        stop_mlflow_server(proc, kill=True)
        raise
    return proc, url


def stop_mlflow_server(proc: subprocess.Popen, kill: bool = False, timeout_s: float = 10.0) -> None:
    """End the server's process group: SIGTERM (SIGKILL if `kill`, or after `timeout_s`)."""
    try:  # the group, not just `proc`: uvicorn runs as its child
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout_s)
    except ProcessLookupError:
        pass


def _log_tail(proc: subprocess.Popen | None, n: int = 2000) -> str:
    path = getattr(proc, "log_path", None)
    if path is None or not Path(path).exists():
        return ""
    return f"; log {path}:\n{Path(path).read_text(errors='replace')[-n:]}"


def mlflow_ui_url(base: str, tracking_uri: str, run_id: str) -> str:
    """The MLflow UI page of a run in the "Model training" layout (MLflow 3 opens
    experiments in its GenAI layout unless the page asks: `workflowType=machine_learning`)."""
    from mlflow import MlflowClient

    try:
        experiment = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is a convenience: the experiments list instead
        return f"{base.rstrip('/')}/#/experiments?workflowType=machine_learning"
    return (f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
            "?workflowType=machine_learning")  # fmt: skip
