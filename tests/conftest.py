import os

# Keep CPU tests deterministic and light on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The small offline demo set as shards: {"train": [glob], "val": [glob], "files": [...]}."""
    from pipelines.data.demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, crops_per_photo=1, clips_per_photo=1, max_count=8)
    return {
        "train": [str(out / "train-*.tar")],
        "val": [str(out / "val-*.tar")],
        "files": sorted(str(p) for p in out.glob("*.tar")),
    }


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray (2 CPUs, dashboard on loopback) for one test module."""
    import ray

    from pipelines.cluster.connect import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def debug_objective():
    """`build(*overrides)`: the training objective of jobs/debug.yaml (+ key=value overrides)
    in this process, on CPU in a world of one, with its DeepSpeed engines, seeded."""
    from pathlib import Path

    from pipelines.config import load_config
    from pipelines.training.objectives import build_objective
    from pipelines.training.parallel import init_single_process_group, setup_accelerator

    def build(*overrides: str):
        device = setup_accelerator(False)
        init_single_process_group(device)
        cfg = load_config(Path(__file__).resolve().parents[1] / "jobs/debug.yaml", list(overrides))
        torch.manual_seed(0)
        objective = build_objective(cfg, device)
        objective.init_engines()
        return objective

    return build


# The switches vqcore reads from the environment at every call. A test that sets one in the
# process (a benchmark's main() does) must restore it: a leak silently changes every later
# test's code path (it happened: the fused interpreter path for the rest of the suite).
_SWITCHES = ("VQCORE_FUSED", "VQCORE_CHECK_FINITE", "TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _environment_switches_do_not_leak():
    before = {k: os.environ.get(k) for k in _SWITCHES}
    yield
    after = {k: os.environ.get(k) for k in _SWITCHES}
    for k, v in before.items():  # put it back first, so that one leak fails one test only
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert after == before, f"the test changed the environment: {before} -> {after}"
