"""Connecting to Ray: the cluster a job was submitted to, else a private local Ray.

Used by every verb that runs on Ray (train, eval, tokenize, tune); may import only the
standard library and Ray.
"""

from __future__ import annotations

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
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", runtime_env=env, **kwargs)



def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster offers GPUs (actors then take one each)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
