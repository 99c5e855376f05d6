"""`vqtok cluster up|down|status`: a one-machine cluster for `ray job submit`.

    vqtok cluster up [--dir runs/cluster] [--host 127.0.0.1] [--num-cpus N] [--num-gpus N]
    export RAY_ADDRESS=http://127.0.0.1:PORT RAY_AUTH_MODE=token     # as `up` prints them
    ray job submit --working-dir /abs/repo -- vqtok train jobs/demo.yaml \
        'data.shards=[/abs/repo/demo_data/train-*.tar]' run.storage=/abs/repo/runs
    ray job status|logs JOB_ID    # work as printed once the two variables are exported
    vqtok cluster status          # cluster.json + whether each part is alive
    vqtok cluster down            # stops only this cluster's processes

`up` starts, side by side:
- an MLflow server (SQLite `DIR/mlflow.db`, artifacts in `DIR/mlartifacts`, served through it);
- a Ray head (`ray start --head`) with its dashboard and job server, its own `--temp-dir`
  (a short path: Ray's socket paths must stay under 107 bytes) and its own free ports, so it
  never meets another Ray on the machine; `MLFLOW_TRACKING_URI` is set in its environment,
  so submitted `vqtok` jobs log to this MLflow unless told otherwise.
Everything is recorded in `DIR/cluster.json` (PIDs, ports, URLs, the address for
`ray job submit`, log paths).

Stopping: `ray stop` ends every Ray process on the machine (it has no way to pick one
cluster), so it is never used. Every process `up` starts carries `VQTOK_CLUSTER_ID=<id>` in
its environment (inherited by raylet, workers, job supervisors and job drivers, which run in
sessions of their own, and by the MLflow server); `down` signals exactly those
(`pipelines.cluster.procs`), in `ray stop`'s order, SIGKILL after a grace period.

Binding and auth: MLflow and Ray's HTTP endpoints (dashboard, job server) listen on `--host`.
With a loopback `--host` (the default) every other Ray port (GCS, raylet, agents, metrics
exporters, client server, workers) is on loopback too (`connect.LOOPBACK_ENV`: `ray start`
has no bind option and swaps a loopback `--node-ip-address` for the machine's address);
`vqtok cluster status` lists what listens. With another `--host` Ray's daemons listen on
every interface. Ray token auth stays ON by default either way (token in `~/.ray/auth_token`,
created if missing): other users of the machine reach loopback too. Clients of this user
need only `RAY_AUTH_MODE=token` (the CLI's default mode is "disabled"); other machines also
need the token (copy the file to `RAY_AUTH_TOKEN_PATH`, or set `RAY_AUTH_TOKEN`).
`--no-auth` (`RAY_AUTH_MODE=disabled`) is for a machine whose ports nobody else can reach; an
explicit `RAY_AUTH_MODE` in the environment wins.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines.cluster.connect import (
    LOOPBACK_ENV,
    RAY_DATA_LOGGING,
    is_loopback,
    verbose,
    worker_pool_env,
)
from pipelines.cluster.procs import (
    cmdline,
    http_ok,
    listening,
    read_bytes,
    stop_tagged,
    tagged_pids,
)
from pipelines.tracking.server import free_port, start_mlflow_server

MARKER = "VQTOK_CLUSTER_ID"
DEFAULT_DIR = "runs/cluster"
MAX_TEMP_DIR = 40  # Ray puts <temp>/session_<date>_<pid>/sockets/plasma_store under it
RAY_PARTS = {  # name -> how its executable or script path ends
    "gcs_server": "/gcs_server",
    "raylet": "/raylet",
    "dashboard": "/dashboard/dashboard.py",
    "autoscaler_monitor": "/autoscaler/_private/monitor.py",
    "log_monitor": "/_private/log_monitor.py",
}


class ClusterError(RuntimeError):
    """A cluster that cannot start, or a cluster folder in a bad state."""


def cluster_pids(cluster_id: str) -> list[int]:
    """Live processes of this cluster: their environment holds `VQTOK_CLUSTER_ID=<id>`."""
    return tagged_pids(MARKER, cluster_id)


def terminate(cluster_id: str, grace_s: float = 15.0) -> dict:
    """Stop the cluster's processes in `ray stop`'s order: raylet, all but the GCS, the rest."""
    return stop_tagged(MARKER, cluster_id, ("/raylet", "/gcs_server"), grace_s)


def _token(token_path: str | None) -> str | None:
    """The Ray auth token for our own HTTP checks (never printed or stored)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    return (read_bytes(token_path).decode().strip() or None) if token_path else None


def _wait_http(url: str, timeout_s: float, what: str, log: Path, token: str | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http_ok(url, token):
            return
        time.sleep(0.5)
    raise ClusterError(f"{what} at {url} did not answer in {timeout_s:.0f} s; see {log}")


# --- up / down / status ------------------------------------------------------------------


def _ray_temp_dir(folder: Path) -> Path:
    """`folder/ray`, or a short /tmp folder (linked as `folder/ray`) when that path is long."""
    link = folder / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    if len(str(link)) <= MAX_TEMP_DIR:
        link.mkdir(parents=True, exist_ok=True)
        return link
    temp = Path(tempfile.mkdtemp(prefix="vqtok-ray-", dir="/tmp"))
    link.symlink_to(temp, target_is_directory=True)
    return temp


def _classify(pids: list[int]) -> dict[str, int]:
    """The head's main daemons by name (gcs_server, raylet, dashboard, ...) -> pid."""
    out: dict[str, int] = {}
    for pid in pids:
        args = cmdline(pid).split(" ")
        for name, pattern in RAY_PARTS.items():
            if any(a.endswith(pattern) for a in args[:3]):
                out.setdefault(name, pid)
    return out


def _token_path(auth_mode: str, bin_dir: str) -> str | None:
    """Token mode: the token file clients need (created once, as `ray start` won't)."""
    if auth_mode != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.is_file():  # writes ~/.ray/auth_token; the token itself is never printed
        subprocess.run([os.path.join(bin_dir, "ray"), "get-auth-token", "--generate"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return str(path)


def _start_ray(cmd: list[str], env: dict, log_path: Path, dashboard: str, timeout_s: float,
               token: str | None) -> None:  # fmt: skip
    with open(log_path, "ab") as log:
        # its own session: Ray's daemons outlive `ray start` and this CLI process
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, timeout=timeout_s).returncode  # fmt: skip
    if rc != 0:
        raise ClusterError(f"`ray start --head` exited with {rc}; see {log_path}")
    _wait_http(f"{dashboard}/api/version", timeout_s, "Ray dashboard", log_path, token)
    _wait_http(f"{dashboard}/api/jobs/", timeout_s, "Ray job server", log_path, token)


def ray_head_argv(bin_dir: str, temp_dir: Path, ports: dict[str, int], host: str = "127.0.0.1",
                  num_cpus: int | None = None, num_gpus: int | None = None) -> list[str]:  # fmt: skip
    """The `ray start --head` command line; the dashboard and job server bind to `host`."""
    cmd = [
        os.path.join(bin_dir, "ray"), "start", "--head", "--disable-usage-stats",
        "--temp-dir", str(temp_dir), "--port", str(ports["gcs"]),
        "--include-dashboard", "true", "--dashboard-host", host,
        "--dashboard-port", str(ports["dashboard"]),
        "--ray-client-server-port", str(ports["client_server"]),
        "--dashboard-agent-listen-port", str(ports["dashboard_agent"]),
        "--num-cpus", str(num_cpus or os.cpu_count() or 1),
    ]  # fmt: skip
    return cmd + (["--num-gpus", str(num_gpus)] if num_gpus is not None else [])


def up(folder: Path, host: str = "127.0.0.1", num_cpus: int | None = None,
       num_gpus: int | None = None, auth: bool = True, timeout_s: float = 120.0) -> dict:  # fmt: skip
    """Start MLflow and a Ray head side by side; write and return `folder/cluster.json`."""
    folder = folder.expanduser().resolve()
    state_path = folder / "cluster.json"
    if state_path.is_file():
        old = json.loads(state_path.read_text())
        if cluster_pids(old.get("cluster_id", "-")):
            raise ClusterError(f"a cluster from {state_path} is running: `vqtok cluster down "
                               f"--dir {folder}` first")  # fmt: skip
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0, cid = time.monotonic(), uuid.uuid4().hex
    client_host = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else host
    bin_dir = str(Path(sys.executable).parent)  # the venv's `ray`, `vqtok` and python
    auth_mode = os.environ.get("RAY_AUTH_MODE") or ("token" if auth else "disabled")
    token_path = _token_path(auth_mode, bin_dir)
    os.environ[MARKER] = cid  # inherited by the MLflow server (this CLI process ends soon)
    mlflow_port = free_port("127.0.0.1" if host in ("", "0.0.0.0") else host)
    mlflow_uri = f"http://{client_host}:{mlflow_port}"
    temp_dir = _ray_temp_dir(folder)
    ports = {"gcs": free_port(), "dashboard": free_port(), "client_server": free_port(),
             "dashboard_agent": free_port()}  # fmt: skip
    dashboard = f"http://{client_host}:{ports['dashboard']}"
    env = {
        **worker_pool_env(num_cpus),
        **os.environ,
        "RAY_AUTH_MODE": auth_mode,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # jobs find `vqtok`
        "MLFLOW_TRACKING_URI": mlflow_uri,  # submitted jobs log to this server by default
        # Ray's own state-API clients (Train's PlacementGroupCleaner, ...) otherwise look for
        # "the" local cluster and fail when several run on the machine
        "RAY_API_SERVER_ADDRESS": dashboard,
        # DeepSpeed JIT-builds its CPU comm op on first use; a cache of our own is built once
        # and kept: the shared default is rebuilt whenever a process with other flags uses it
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
        or str(Path.home() / ".cache" / "vqtok" / "torch_extensions"),
        # the raylet waits this long for its dashboard agent (a Python process that took
        # ~20 s to start on a loaded 2-core machine; past the default the raylet aborts)
        "RAY_agent_register_timeout_ms": os.environ.get("RAY_agent_register_timeout_ms")
        or str(int(timeout_s * 1000)),
        "RAY_USAGE_STATS_ENABLED": "0",
        # one machine: no node can be drained. Ray Train's PreemptionWatcher (it only logs
        # drain events) ends every run with an error-level line from the core worker
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get(
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
    }
    if not verbose():  # Ray Data's console at WARNING: this file exists on the one machine
        env.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING)
    if is_loopback(host):  # every Ray port on loopback (connect.LOOPBACK_ENV), jobs' too
        env.update(LOOPBACK_ENV)
    cmd = ray_head_argv(bin_dir, temp_dir, ports, host, num_cpus, num_gpus)
    start_log = logs / "ray-start.log"
    with ThreadPoolExecutor(1) as pool:  # MLflow boots (~6-60 s) while Ray starts
        ml = pool.submit(
            start_mlflow_server, f"sqlite:///{folder / 'mlflow.db'}", folder / "mlartifacts",
            host=host, port=mlflow_port, log_path=logs / "mlflow.log", timeout_s=timeout_s,
        )  # fmt: skip
        try:
            _start_ray(cmd, env, start_log, dashboard, timeout_s, _token(token_path))
            proc, _ = ml.result()
        except BaseException:
            terminate(cid, grace_s=3.0)
            raise
    pids = cluster_pids(cid)
    gcs = read_bytes(str(temp_dir / "ray_current_cluster")).decode().strip()
    state = {
        "cluster_id": cid,
        "dir": str(folder),
        "host": host,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "startup_s": round(time.monotonic() - t0, 1),
        "ray": {
            "address": dashboard,  # RAY_ADDRESS for `ray job submit` / JobSubmissionClient
            "dashboard_url": dashboard,
            "gcs_address": gcs or f"{client_host}:{ports['gcs']}",  # ray.init / worker nodes
            "ports": ports,
            "auth_mode": auth_mode,
            "auth_token_path": token_path,
            "temp_dir": str(temp_dir),
            "pids": _classify(pids),
            "num_cpus": num_cpus or os.cpu_count(),
            "logs": {"start": str(start_log), "session": str(temp_dir / "session_latest" / "logs")},
        },
        "mlflow": {
            "uri": mlflow_uri,
            "pid": proc.pid,
            "backend": f"sqlite:///{folder / 'mlflow.db'}",
            "artifacts": str(folder / "mlartifacts"),
            "log": str(logs / "mlflow.log"),
        },
        "env": {"RAY_ADDRESS": dashboard, "RAY_AUTH_MODE": auth_mode},
        "submit": submit_line(Path.cwd()),
        "submit_quiet": submit_line(Path.cwd(), ("vqtok", "submit")),
    }  # fmt: skip
    state_path.write_text(json.dumps(state, indent=1))
    return state


def submit_line(root: Path, client: tuple[str, ...] = ("ray", "job", "submit")) -> str:
    """The demo job's submit command with absolute, shell-quoted paths (right from any folder
    and in any shell; the globs are expanded by vqtok, not the shell); `client` is the
    submitting command (`ray job submit`, or `vqtok submit`, which takes the same line)."""
    root = root.resolve()
    args = [*client, "--working-dir", str(root), "--", "vqtok", "train",
            "jobs/demo.yaml", f"data.shards=[{root}/demo_data/train-*.tar]",
            f"train.eval_shards=[{root}/demo_data/val-*.tar]", f"run.storage={root}/runs"]  # fmt: skip
    return shlex.join(args)


def load_state(folder: Path) -> dict:
    path = folder.expanduser().resolve() / "cluster.json"
    if not path.is_file():
        raise ClusterError(f"no cluster here: {path} does not exist (`vqtok cluster up`)")
    return json.loads(path.read_text())


def status(folder: Path) -> dict:
    """cluster.json plus liveness: which recorded processes run, and whether the dashboard,
    the job server and MLflow answer."""
    state = load_state(folder)
    pids = cluster_pids(state["cluster_id"])
    dash, ml = state["ray"]["dashboard_url"], state["mlflow"]["uri"]
    token = _token(state["ray"].get("auth_token_path"))
    state["alive"] = {
        **{name: pid in pids for name, pid in state["ray"]["pids"].items()},
        "mlflow_server": state["mlflow"]["pid"] in pids,
        "dashboard_http": http_ok(f"{dash}/api/version", token),
        "job_server_http": http_ok(f"{dash}/api/jobs/", token),
        "mlflow_http": http_ok(f"{ml}/health"),
    }
    state["processes"] = len(pids)
    state["listening"] = listening(pids)  # loopback only unless `up --host` said otherwise
    return state


def down(folder: Path, grace_s: float = 15.0) -> dict:
    """Stop this cluster's processes (Ray head, its workers and jobs, MLflow) and nothing else."""
    state = load_state(folder)
    cid = state["cluster_id"]
    before = len(cluster_pids(cid))
    counts = terminate(cid, grace_s)
    left = cluster_pids(cid)
    state["stopped_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (Path(state["dir"]) / "cluster.json").write_text(json.dumps(state, indent=1))
    return {"processes": before, **counts, "left": left}


# --- CLI ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("VQTOK_CLUSTER_DIR", DEFAULT_DIR)),
                   help=f"cluster folder: cluster.json, MLflow store, logs (default {DEFAULT_DIR}, "
                   "or $VQTOK_CLUSTER_DIR)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    p.add_argument("--no-auth", action="store_true", help="RAY_AUTH_MODE=disabled: no token; anyone who reaches the "
                   "GCS port can run code here (only on a trusted network)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers (default: all)")
    p.add_argument(
        "--num-gpus", type=int, default=None, help="GPUs the head offers (default: Ray's)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each part")


def _print_up(s: dict) -> None:
    ray, ml = s["ray"], s["mlflow"]
    print(f"[vqtok] cluster up in {s['startup_s']:.0f} s: {s['dir']}/cluster.json")
    print(f"  Ray dashboard + job server  {ray['dashboard_url']}  (GCS {ray['gcs_address']})")
    print(f"  MLflow                      {ml['uri']}  (jobs log here: MLFLOW_TRACKING_URI)")
    if ray["auth_mode"] == "token":
        print(f"  Ray token auth on: this user's clients read {ray['auth_token_path']}; other "
              "machines need that file (RAY_AUTH_TOKEN_PATH) or RAY_AUTH_TOKEN")  # fmt: skip
    else:
        print("  Ray token auth OFF: anyone who reaches the GCS port can run code here")
    env = " ".join(f"{k}={v}" for k, v in s["env"].items())
    print(f"  export {env}   # then ray job submit / status / logs work as printed")
    print(f"  submit (absolute paths: the job runs in an uploaded copy of the repo):\n"
          f"    {s['submit']}\n"
          f"    or, with only the job's output and its end status:\n"
          f"    {s['submit_quiet']}")  # fmt: skip
    print(f"  logs: {ray['logs']['session']}  {ml['log']}")
    print(f"  stop: vqtok cluster down --dir {s['dir']}")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "up":
            state = up(args.dir, args.host, args.num_cpus, args.num_gpus, not args.no_auth,
                       args.timeout)  # fmt: skip
            _print_up(state)
            return 0
        if args.action == "status":
            s = status(args.dir)
            print(json.dumps(s, indent=1))
            return 0 if s["processes"] and all(s["alive"].values()) else 1
        t0 = time.monotonic()
        result = down(args.dir)
        print(f"[vqtok] cluster down in {time.monotonic() - t0:.1f} s: {result['processes']} "
              f"processes, {result['terminated']} sent SIGTERM, {len(result['killed'])} SIGKILL")  # fmt: skip
        for line in result["killed"]:
            print(f"  killed (ignored SIGTERM for the grace period): {line}")
        if result["left"]:
            print(f"vqtok cluster: still running: {result['left']}", file=sys.stderr)
            return 1
        return 0
    except ClusterError as exc:
        print(f"vqtok cluster: {exc}", file=sys.stderr)
        return 2
