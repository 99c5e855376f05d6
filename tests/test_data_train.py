"""The Ray Dataset from `build_dataset` inside a real Ray Train run (`get_dataset_shard`)."""

from __future__ import annotations

import json
import logging

import pytest

from pipelines.data.batches import DataConfig
from pipelines.data.demo_data import make_demo_data
from pipelines.data.ray_dataset import build_dataset
from pipelines.data.stream import iter_batches


@pytest.mark.ray
@pytest.mark.slow
def test_two_train_workers_share_the_epoch(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

    # Defined here so cloudpickle ships it by value (workers cannot import tests/).
    def _loop(config):
        import ray.train

        from pipelines.data.stream import BatchStream

        stream = BatchStream(ray.train.get_dataset_shard("train"))
        shapes = set()
        keys = []
        for batch in stream:
            shapes.add(tuple(batch["video"].shape[1:]))
            keys += batch["keys"]
        rank = ray.train.get_context().get_world_rank()
        out = {
            "keys": keys,
            "shapes": sorted(shapes),
            "batches": stream.batches,
            "metrics": stream.metrics(),
        }
        with open(f"{config['out']}/rank{rank}.json", "w") as f:
            json.dump(out, f)

    make_demo_data(tmp_path / "demo", crops_per_photo=1, clips_per_photo=1, max_count=8)
    cfg = DataConfig(
        shards=(str(tmp_path / "demo" / "train-*.tar"),),
        resolutions=((32, 32),),
        frame_counts=(4,),
        batch_size=4,
    )
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        trainer = TorchTrainer(
            _loop,
            train_loop_config={"out": str(tmp_path)},
            # docs/RUNTIME.md: on 2 cores, workers take a fraction of a CPU or Data starves
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
            datasets={"train": build_dataset(cfg)},
            run_config=RunConfig(name="data", storage_path=str(tmp_path / "runs")),
        )
        trainer.fit()
    finally:
        ray.shutdown()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    everything = [k for b in iter_batches(cfg) for k in b["keys"]]
    # Ray Train splits with equal=True: both ranks get the same number of batches (rows),
    # and at most one batch (row) of the epoch is left out to make them equal.
    seen = ranks[0]["keys"] + ranks[1]["keys"]
    assert len(set(seen)) == len(seen) and set(seen) <= set(everything)
    assert len(everything) - len(seen) <= cfg.batch_size
    assert ranks[0]["batches"] == ranks[1]["batches"] > 0
    for r in ranks:
        assert all(tuple(s) in ((3, 4, 32, 32), (3, 1, 32, 32)) for s in r["shapes"])  # images: T=1
        assert r["metrics"]["data/skipped"] == 0
