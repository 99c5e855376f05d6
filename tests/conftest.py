import os

# Keep CPU tests deterministic and light on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The small offline demo set as shards: {"train": [glob], "val": [glob], "files": [...]}."""
    from pipelines.demo_data import make_demo_data

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

    from pipelines.train import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()
