"""Connecting to Ray: the cluster a job was submitted to, else a private local Ray.

Used by every verb that runs on Ray (train, eval, tokenize, tune); may import only the
standard library and Ray.
"""

from __future__ import annotations

import contextlib
import os

# forwarded to workers: accelerator choice, extension cache, MLflow and S3 endpoints
_WORKER_ENV = (
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "MLFLOW_TRACKING_URI",
    "TORCH_HOME",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "RAY_DATA_DISABLE_PROGRESS_BARS",
    "RAY_API_SERVER_ADDRESS",
    "OMP_NUM_THREADS",
    "VQTOK_VERBOSE",
    "PYTHONWARNINGS",
    "AWS_ENDPOINT_URL",  # an S3-compatible shard store (credentials: each node's own chain)
    "RAY_DATA_LOGGING_CONFIG",
)
# Ray Data's console at WARNING (ray_data_logging.yaml); only for a Ray we start here: on a
# cluster the file's path would not exist on other nodes, and Ray Data fails on a missing one
RAY_DATA_LOGGING = os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml")


# in the environment of the processes of a private local Ray (set only while `ray.init`
# starts them): "<driver pid>:<its start time>"; when that driver is gone (SIGKILLed) and
# they are not, the next vqtok run that starts a local Ray stops them
OWNER = "VQTOK_LOCAL_RAY_OWNER"


def worker_pool_env(num_cpus: float | None = None) -> dict[str, str]:
    """Ray settings for the raylet of a Ray we start: keep twice as many idle workers as
    CPUs. Ray's default (as many as CPUs) kills idle workers past it after 1 s, and the data
    path's decode tasks take half a CPU (`DataConfig.num_cpus`): between two passes, or
    whenever the trainer holds the stream back, half the decode workers were killed and the
    next pass started new ones, each importing Ray Data and torch again (~3 CPU-s a worker;
    BENCHMARKS.md "Data path": 233 against 710 frames/s over 12 passes)."""
    cpus = num_cpus or os.cpu_count() or 1
    return {"RAY_num_workers_soft_limit": str(max(4, int(2 * cpus)))}


# A Ray of one machine on loopback only. Ray binds its daemons (GCS, raylet, agents, metrics
# exporters, workers) to the node's address, and takes loopback for it only where it thinks
# no cluster can be made (`ray_constants.ENABLE_RAY_CLUSTER`, read from this variable when
# `ray` is imported); a loopback `--node-ip-address` is swapped for the machine's address
# (docs/RUNTIME.md).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def verbose() -> bool:
    """`vqtok --verbose` (or VQTOK_VERBOSE=1): let Ray, DeepSpeed and torch say everything."""
    return os.environ.get("VQTOK_VERBOSE", "") not in ("", "0")


def init_ray(**kwargs) -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`; `auto` = the cluster
    `ray start` made on this machine), else start a private local Ray (never an unrelated
    Ray that happens to run here); forwards the few environment variables workers need."""
    import socket

    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        # Train V2's PlacementGroupCleaner asks the state API (the dashboard) whether a run's
        # controller is alive, to free its CPUs when it dies (a failed run, a trial ASHA
        # stops). Without a dashboard, or with another Ray on the host ("Found multiple
        # active Ray instances"), it cannot, and stopped runs keep their CPUs reserved. So a
        # local Ray gets its dashboard on a free port, named to every worker.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        reap_orphans()
        for key, value in worker_pool_env(kwargs.get("num_cpus")).items():
            os.environ.setdefault(key, value)  # read by the raylet ray.init starts
        # one machine: no node can be drained; Ray Train's PreemptionWatcher (it only logs
        # drain events) would end every run with an error-level line from the core worker
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if not verbose():
            os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING)
        kwargs = {"include_dashboard": True, "dashboard_host": "127.0.0.1",
                  "dashboard_port": port, **kwargs}  # fmt: skip
    # Each report blocks until the controller polls; 2 s by default (docs/RUNTIME.md).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # per-epoch progress bars of Ray Data would bury the training progress line
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not verbose():
        # quiet by default: library deprecation warnings in every worker, and the INFO lines
        # of Ray's libraries (a line per Ray Data pass, per report, ...) say nothing to a user
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
        kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="WARNING"))
    env = {"env_vars": {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}}
    local = not os.environ.get("RAY_ADDRESS")
    if local:  # inherited by the Ray processes started now, not by this driver's later children
        os.environ[OWNER] = _owner(os.getpid())
    try:
        if local:
            with _loopback_node():
                ray.init(address="local", runtime_env=env, **kwargs)
        else:
            ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, **kwargs)
    finally:
        if local:
            os.environ.pop(OWNER, None)


@contextlib.contextmanager
def _loopback_node():
    """A private local Ray on loopback only: its daemons read `LOOPBACK_ENV` as they start;
    this driver read Ray's flag when it imported `ray`, so the flag is set for the call too.
    Both are put back after: a later `ray.init` of this process may join a real cluster."""
    from ray._private import ray_constants

    saved_env = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _owner(pid: int) -> str:
    from pipelines.cluster.procs import start_time

    return f"{pid}:{start_time(pid)}"


def local_ray_pids(driver_pid: int) -> list[int]:
    """The live processes of the private local Ray that driver `driver_pid` started."""
    from pipelines.cluster.procs import tag_values

    return [p for value, pids in tag_values(OWNER).items()
            if value.split(":")[0] == str(driver_pid) for p in pids]  # fmt: skip


def reap_orphans(grace_s: float = 6.0) -> list[str]:
    """Stop what private local Rays left behind when their driver died without stopping
    them (a SIGKILLed `vqtok train`: raylet, GCS, dashboard and runtime-env agents, idle
    workers). Only processes tagged with `OWNER` whose owner is no longer alive are
    signalled: never another user's Ray, a `vqtok cluster up` cluster or a live run's.
    Returns "pid cmdline" of those stopped, and says so in one line."""
    from pipelines.cluster.procs import cmdline, stop_tagged, tag_values

    stopped = []
    for value, pids in tag_values(OWNER).items():
        owner = value.split(":")[0]
        if owner.isdigit() and _owner(int(owner)) == value:
            continue  # its driver still runs
        stopped += [f"{pid} {cmdline(pid)[:60]}" for pid in pids]
        stop_tagged(OWNER, value, ("/raylet", "/gcs_server"), grace_s)
    if stopped:
        print(f"[vqtok] stopped {len(stopped)} processes a killed run's local Ray left "
              "behind", flush=True)  # fmt: skip
    return stopped


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster offers GPUs (actors then take one each)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
