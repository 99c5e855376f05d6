"""Cluster manifests and job configs (no cluster needed), and a real one-machine cluster:
`vqtok cluster up` on loopback, `ray job submit` of a 2-step training job, its MLflow run on
the cluster's server, `vqtok cluster down` leaving none of its processes."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipelines.config import Config, load_config
from pipelines.studies.ablation import load_study
from vqcore.models import PVQVAEConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
CONFIG_SECTIONS = {f.name for f in dataclasses.fields(Config)}


def _yaml(rel: str):
    return yaml.safe_load((ROOT / rel).read_text())


# --- jobs/ -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_config_loads(path, tmp_path):
    shards = [f"data.shards=[{tmp_path}/train-*.tar]"]
    raw = yaml.safe_load(path.read_text())
    if "ablation" in raw:  # a study: every variant at every scale is a valid config
        for scale, overrides in raw["ablation"]["scales"].items():
            study = load_study(path, shards, scale=scale)
            variants = list(raw["ablation"]["variants"])  # a scale may replace or add some
            variants += [k.removeprefix("ablation.variants.") for k in overrides
                         if k.startswith("ablation.variants.")
                         and k.removeprefix("ablation.variants.") not in variants]  # fmt: skip
            assert list(study.configs) == variants
        return
    if set(raw) - CONFIG_SECTIONS:  # another verb's file (e.g. a tune study): its run config
        path = tmp_path / path.name
        path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k in CONFIG_SECTIONS}))
    cfg = load_config(path, shards)
    if raw.get("data", {}).get("frame_counts") == [1]:
        assert cfg.model.name in ("image_tokenizer", "hfsvq")


def test_recipe_configs_follow_the_seed():
    for name in ("pvqvae_256", "pvqvae_multires"):
        cfg = load_config(ROOT / f"jobs/{name}.yaml")
        default = PVQVAEConfig.flavours["default"]
        assert cfg.model.channels == default.channels and cfg.model.latent_dim == 16
        assert cfg.model.quantizer["type"] == "pyramid"
        assert cfg.model.quantizer["inner"] == {"type": "lfq", "codebook_dim": 16}
        o, t = cfg.optim, cfg.train
        assert (o.name, o.lr, tuple(o.betas), o.eps, o.grad_clip) == (
            "adam",
            1e-5,
            (0.9, 0.95),
            1e-8,
            1.0,
        )
        assert (t.ema_decay, t.seed, t.precision) == (0.999, 42, "auto") and cfg.scaling.use_gpu
    multi = load_config(ROOT / "jobs/pvqvae_multires.yaml")
    assert len(multi.data.resolutions) == 10 and multi.data.frame_counts == (16, 32, 48, 96)
    assert multi.train.zero_stage == 3 and multi.train.activation_checkpointing
    assert multi.scaling.num_workers * multi.data.batch_size * multi.optim.grad_accum == 1024
    assert "64 × 4 × 4 = 1024" in (ROOT / "jobs/pvqvae_multires.yaml").read_text()
    demo = load_config(ROOT / "jobs/demo.yaml")
    assert (demo.scaling.num_workers, demo.scaling.cpus_per_worker) == (2, 0.5)
    assert (demo.train.zero_stage, demo.train.precision, demo.scaling.use_gpu) == (2, "fp32", False)
    assert max(max(r) for r in demo.data.resolutions) <= 64


# --- cluster/ ----------------------------------------------------------------------------


def test_ray_up_config_is_valid_and_split():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml("cluster/ray-cluster.yaml")
    validate_config(prepare_config(yaml.safe_load(yaml.safe_dump(raw))))  # Ray's own schema
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in c for c in raw["head_start_ray_commands"])
    cpu = [
        n
        for n, t in types.items()
        if t["resources"].get("CPU", 0) > 0 and "GPU" not in t["resources"]
    ]
    gpu = [n for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert cpu and gpu and raw["head_node_type"] not in cpu + gpu
    assert any("pip install" in c and "vqtok" in c for c in raw["setup_commands"])
    assert any("/mnt/vqtok" in c for c in raw["setup_commands"])  # the shared run storage
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("MLFLOW_TRACKING_URI=" in c for c in raw[key]), key
    assert "run.storage=/mnt/vqtok/" in (ROOT / "cluster/ray-cluster.yaml").read_text()
    # issue 27: no AMI alias that resolves to an old image; one AMI and an S3-reading profile
    # on every node type; the EFS name set in the file, refused while unset; one Ray version
    # and the cu128 torch pair on every node
    assert {t["node_config"]["ImageId"] for t in types.values()} == {"ami-SET-ME"}
    assert all(t["node_config"]["IamInstanceProfile"] == {"Name": "vqtok-node"}
               for t in types.values())  # fmt: skip
    setup = " ".join(raw["setup_commands"])
    assert "EFS_DNS" not in setup and "case $EFS in fs-SET-ME*)" in setup and "exit 1" in setup
    assert '"ray[default,train,tune,data]==2.60.0"' in setup and "whl/cu128" in setup
    torch_pin = next(d for d in _pyproject_deps() if d.startswith("torch=="))
    assert torch_pin in setup


def _pyproject_deps() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _check_kuberay_split(spec: dict) -> str:
    """Head with no work, a CPU group, a GPU group; MLflow env and the shared volume in every
    pod. Returns the shared mount path."""
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert spec["authOptions"] == {"mode": "token"}  # KubeRay's token auth, not disabled
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    gpus = {}
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus[g["groupName"]] = int(limits.get("nvidia.com/gpu", 0))
    assert sorted(gpus.values())[0] == 0 and max(gpus.values()) > 0, gpus  # cpu and gpu groups
    mounts = set()
    for pod in pods:  # issue 27: S3 credentials, pulls, a run folder the ray user can write
        assert pod["serviceAccountName"] == "vqtok" and pod["imagePullSecrets"]
        assert any("chown 1000" in " ".join(c["command"]) for c in pod["initContainers"])
        container = pod["containers"][0]
        memory = container["resources"]["requests"]["memory"]
        assert memory.endswith("Gi") and int(memory[:-2]) <= 512, memory  # fits real nodes
        assert "MLFLOW_TRACKING_URI" in {e["name"] for e in container["env"]}
        assert "RAY_AUTH_MODE" not in {e["name"] for e in container["env"]}  # KubeRay sets it
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts |= {m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}
    assert len(mounts) == 1, mounts
    return mounts.pop()


def test_dockerfile_installs_the_cu128_torch_pair_first():
    text = (ROOT / "cluster/Dockerfile").read_text()
    base = next(line for line in text.splitlines() if line.startswith("FROM "))
    assert base.endswith("-cu128"), base
    torch_pin = next(d for d in _pyproject_deps() if d.startswith("torch=="))
    assert text.index(torch_pin) < text.index("whl/cu128") < text.index("pip install --no-cache-dir -e .")


def test_kuberay_raycluster():
    rc = _yaml("cluster/kuberay/raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_kuberay_split(rc["spec"])


def test_kuberay_rayjob_runs_a_vqtok_job_config():
    job = _yaml("cluster/kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    mount = _check_kuberay_split(job["spec"]["rayClusterSpec"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["vqtok", "train", "jobs/pvqvae_multires.yaml"]
    cfg = load_config(ROOT / argv[2], argv[3:])
    assert cfg.run.storage.startswith(mount + "/")  # checkpoints on the shared volume


def test_ray_temp_dir_stays_short(tmp_path):
    from pipelines.cluster.local import MAX_TEMP_DIR, _ray_temp_dir

    long_folder = tmp_path / ("x" * 40)
    temp = _ray_temp_dir(long_folder)
    try:  # Ray's socket paths (<temp>/session_*/sockets/...) must fit in 107 bytes
        assert len(str(temp)) <= MAX_TEMP_DIR and temp.is_dir()
        assert (long_folder / "ray").resolve() == temp.resolve()  # logs easy to find
    finally:
        shutil.rmtree(temp, ignore_errors=True)


# --- a real cluster ----------------------------------------------------------------------


def _run(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw
    )


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cluster_up_submit_down():
    from mlflow.tracking import MlflowClient

    from pipelines.cluster.local import cluster_pids
    from pipelines.cluster.procs import alive
    from pipelines.data.demo_data import make_demo_data

    # not under pytest's tmp_path: a concurrent pytest session may prune old basetemp
    # folders, and Ray's socket paths want a short temp dir
    work = Path(tempfile.mkdtemp(prefix="vqc-", dir="/tmp"))
    folder, times, state = work / "cluster", {}, None
    try:
        make_demo_data(work / "demo", crops_per_photo=1, clips_per_photo=1, max_count=8)
        t0 = time.monotonic()
        up = _run([BIN / "vqtok", "cluster", "up", "--dir", folder, "--num-cpus", "2"], 400)
        times["up"] = time.monotonic() - t0
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((folder / "cluster.json").read_text())
        status = _run([BIN / "vqtok", "cluster", "status", "--dir", folder], 60)
        assert status.returncode == 0 and all(json.loads(status.stdout)["alive"].values())
        assert state["ray"]["dashboard_url"].startswith("http://127.0.0.1:")
        assert state["mlflow"]["uri"].startswith("http://127.0.0.1:")

        env = {**os.environ, "RAY_AUTH_MODE": state["ray"]["auth_mode"]}
        job_id = f"vqtok-test-{int(time.time())}"
        t0 = time.monotonic()
        submit = _run(
            [BIN / "ray", "job", "submit", "--address", state["ray"]["address"],
             "--submission-id", job_id, "--working-dir", ROOT, "--",
             "vqtok", "train", "jobs/debug.yaml", "train.steps=2", "train.log_every=1",
             f"data.shards=[{work}/demo/train-*.tar]",
             f"train.eval_shards=[{work}/demo/val-*.tar]",
             f"run.storage={work}/runs", "run.name=submitted",
             f"run.tracking_uri={state['mlflow']['uri']}"],
            600, env=env,
        )  # fmt: skip
        times["job"] = time.monotonic() - t0
        status = _run([BIN / "ray", "job", "status", "--address", state["ray"]["address"], job_id],
                      60, env=env)  # fmt: skip
        said = status.stdout + status.stderr  # "Job '<id>' succeeded" (the CLI's words)
        assert f"Job '{job_id}' succeeded" in said, submit.stdout[-3000:] + said
        assert (work / "runs" / "submitted" / "step_00000002").is_dir()
        # every port of the cluster (GCS, raylet, agents, exporters, MLflow) on loopback
        listen = json.loads(_run([BIN / "vqtok", "cluster", "status", "--dir", folder],
                                 60).stdout)["listening"]  # fmt: skip
        assert len(listen) >= 6 and all(a.startswith("127.") for a in listen), listen

        client = MlflowClient(state["mlflow"]["uri"])
        exp = client.get_experiment_by_name("vqtok")
        runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'submitted'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert "eval/psnr" in runs[0].data.metrics

        # `vqtok submit`: the same job through the client library, the log is the job's
        # output between the job's id and its end status (a --verbose after -- is the job's,
        # not the client's: no packaging lines); a failing job exits 1
        env["RAY_ADDRESS"] = state["ray"]["address"]
        t0 = time.monotonic()
        ours = _run(
            [BIN / "vqtok", "submit", "--working-dir", ROOT, "--",
             "vqtok", "train", "jobs/debug.yaml", "train.steps=2", "train.log_every=1",
             f"data.shards=[{work}/demo/train-*.tar]", f"train.eval_shards=[{work}/demo/val-*.tar]",
             f"run.storage={work}/runs", "run.name=submitted2", "--verbose"],
            600, env=env,
        )  # fmt: skip
        times["vqtok submit"] = time.monotonic() - t0
        log = ours.stdout + ours.stderr
        assert ours.returncode == 0 and ": SUCCEEDED" in log, log[-3000:]
        assert "[vqtok] step 2/2" in log and "Ignoring upload" not in log and "Next steps" not in log
        assert (work / "runs" / "submitted2" / "step_00000002").is_dir()
        failed = _run([BIN / "vqtok", "submit", "--working-dir", ROOT, "--",
                       "vqtok", "train", "jobs/no-such.yaml"], 300, env=env)  # fmt: skip
        log = failed.stdout + failed.stderr
        assert failed.returncode == 1 and ": FAILED" in log, log[-3000:]
        assert "vqtok train: config file not found: jobs/no-such.yaml" in log
    finally:
        if state is not None:
            t0 = time.monotonic()
            down = _run([BIN / "vqtok", "cluster", "down", "--dir", folder], 120)
            times["down"] = time.monotonic() - t0
        print(f"\ncluster timings (s): {json.dumps({k: round(v, 1) for k, v in times.items()})}")
        shutil.rmtree(work, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert cluster_pids(state["cluster_id"]) == []
    recorded = [*state["ray"]["pids"].values(), state["mlflow"]["pid"]]
    assert not any(alive(p) for p in recorded)


def test_submit_line_is_absolute_and_quoted(tmp_path):
    """Issue 22 item 5: the printed line works from any folder and in zsh (globs quoted)."""
    import shlex

    from pipelines.cluster.local import submit_line

    line = submit_line(tmp_path / "my repo")
    words = shlex.split(line)
    root = str((tmp_path / "my repo").resolve())
    assert words[:5] == ["ray", "job", "submit", "--working-dir", root]
    assert f"data.shards=[{root}/demo_data/train-*.tar]" in words
    assert "'data.shards=[" in line  # the glob is quoted for the shell
    quiet = shlex.split(submit_line(tmp_path / "my repo", ("vqtok", "submit")))
    assert quiet[:2] == ["vqtok", "submit"] and quiet[2:] == words[3:]


def test_ray_data_console_config_loads_and_is_quiet():
    """The Ray Data logging file a local Ray gets (RAY_DATA_LOGGING_CONFIG): Ray's own layout
    with the console at WARNING (no line per epoch), everything still in ray-data.log."""
    import logging.config

    from pipelines.cluster.connect import RAY_DATA_LOGGING

    cfg = yaml.safe_load(Path(RAY_DATA_LOGGING).read_text())
    assert cfg["handlers"]["console"]["level"] == "WARNING"
    assert set(cfg["loggers"]["ray.data"]["handlers"]) == {"file", "console"}
    logging.config.dictConfig(cfg)  # the classes it names exist in this Ray
    handlers = logging.getLogger("ray.data").handlers
    assert {type(h).__name__ for h in handlers} == {"SessionFileHandler", "PlainRayHandler"}
