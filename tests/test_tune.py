"""`vqtok tune`: the search-space parser (fast), and a real two-trial study on demo shards: a
local Ray (2 CPUs, dashboard), ASHA on eval/psnr, Ray Train V2 inside each trial, one
MLflow store with a parent run and its child runs."""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml

from pipelines.config import ConfigError, load_config
from pipelines.studies.tune import load_study
from pipelines.studies.tune_space import check_key, parse_domain
from vqcore.models import model_config

JOB = "jobs/tune_looc.yaml"


# --- the space parser -----------------------------------------------------------------------


def test_job_parses_into_config_and_space():
    cfg, tc, _ = load_study(JOB, ["tune.num_samples=3", "optim.lr=0.002"])
    assert cfg.model == model_config({"type": "image_tokenizer", "flavour": "looc_vae_debug"})
    assert cfg.optim.lr == 0.002
    assert tc.num_samples == 3 and tc.metric == "eval/psnr" and tc.scheduler.type == "asha"
    assert 0 < cfg.train.eval_every <= tc.scheduler.grace_period  # ASHA sees evals at rungs
    assert set(tc.space) >= {"model.quantizer.codebook_size", "model.quantizer.alpha", "optim.lr"}


def test_domains_and_their_probe_values():
    assert parse_domain("a", {"randint": [1, 3]})[1] == [1, 3]  # both ends included
    domain, probes = parse_domain("optim.lr", {"loguniform": ["1e-4", 3.0e-3]})  # YAML 1.1
    assert probes == [1e-4, 3e-3] and 1e-4 <= domain.sample() <= 3e-3
    assert parse_domain("k", {"grid": [16, 64]})[0] == {"grid_search": [16, 64]}


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.space.optim.lr={logunif: [1, 2]}", r"tune\.space\.optim\.lr: unknown domain"),
        ("tune.space.optim.lr=0.1", r"tune\.space\.optim\.lr: expected one \{domain: args\}"),
        ("tune.space.optim.lr={loguniform: [0, 1]}", r"optim\.lr: loguniform needs lo > 0"),
        ("tune.space.optim.lr={uniform: [2, 1]}", r"optim\.lr: uniform needs lo < hi"),
        ("tune.space.model.quantizer.alpha={randint: [1, 2.5]}", r"alpha: randint takes"),
        ("tune.space.optim.lrr={choice: [1]}", r"tune\.space\.optim\.lrr: 'lrr' is not a key"),
        ("tune.space.nosuch.key={choice: [1]}", r"tune\.space\.nosuch\.key: 'nosuch'"),
        ("tune.space.optim={choice: [1]}", r"tune\.space\.optim: names a whole section"),
        ("tune.space.run.name={choice: [a]}", r"tune\.space\.run\.name: run\.\* is set"),
        ("tune.space.model.quantizer.foo={choice: [1]}", r"quantizer\.foo: 1 .*'foo'"),
        ("tune.space.model.quantizer.codebook_dim={choice: [4, 5]}", r"codebook_dim: 5 .*divisor"),
        ("tune.space.model.quantizer.type={choice: [looc, vq]}", r"tune\.space: the combination"),
        ("tune.mode=up", r"tune\.mode"),
        ("tune.nosuch=1", r"tune\.nosuch"),
        ("tune.scheduler.grace_period=1000", r"tune\.scheduler\.grace_period"),
        ("train.eval_every=0", r"train\.eval_every"),
        ("tune.metric=psnr", r"tune\.metric"),
    ],
)
def test_bad_study_fails_at_once_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_study(JOB, [override])


def test_key_outside_the_tree_and_missing_section(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lr is a value"):
        check_key("optim.lr.x")
    check_key("model.anything")  # dict sections: checked by the probes instead
    plain = tmp_path / "plain.yaml"
    plain.write_text("train: {steps: 2}\n")
    with pytest.raises(ConfigError, match="tune:"):
        load_study(plain)


# --- a real study ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_tune():
    import ray

    from pipelines.cluster.connect import init_ray

    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    init_ray(num_cpus=2, log_to_driver=False)  # with the dashboard: see init_ray
    yield
    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    if before is not None:
        os.environ["RAY_API_SERVER_ADDRESS"] = before


@pytest.mark.ray
@pytest.mark.slow
def test_two_trial_study_ends_with_best_config_and_nested_runs(tmp_path, ray_tune, capsys):
    import ray
    from mlflow.tracking import MlflowClient

    from pipelines.data.demo_data import make_demo_data
    from pipelines.studies.tune import run_study

    data = tmp_path / "demo"
    make_demo_data(data, crops_per_photo=1, clips_per_photo=1, max_count=8)
    cfg, tc, base = load_study(JOB, [
        f"data.shards=[{data}/train-*.tar]", f"train.eval_shards=[{data}/val-*.tar]",
        f"run.storage={tmp_path / 'runs'}", "run.name=study", "train.steps=4",
        "train.eval_every=2", "train.log_every=2", "train.ckpt_every=4", "train.eval_batches=1",
        "tune.num_samples=2", "tune.max_concurrent_trials=2", "tune.scheduler.grace_period=2",
    ])  # fmt: skip
    assert cfg.scaling.num_workers == 1 and cfg.scaling.cpus_per_worker == 0.45
    summary = run_study(cfg, tc, base)
    study = cfg.run.run_dir
    out = capsys.readouterr().out  # vqtok's line per trial event, not Tune's status tables
    assert out.count(" started: model.quantizer.") == 2 and out.count(" ended at step ") == 2, out
    assert "step 2: eval/psnr " in out and "Trial status" not in out, out
    assert "View detailed results" not in out, out  # nor Tune's experiment box

    rows = json.loads((study / "trials.json").read_text())["trials"]
    assert len(rows) == 2 and len((study / "trials.csv").read_text().splitlines()) == 3
    assert {r["status"] for r in rows} <= {"FINISHED", "STOPPED"}, rows
    assert "FINISHED" in {r["status"] for r in rows}  # ASHA keeps the first to each rung
    assert all(r["eval/psnr"] > 0 for r in rows)

    best = load_config(study / "best_config.yaml")  # runnable with `vqtok train`
    assert best.run.name == "study-best" and best.run.parent_run_id is None
    for key in tc.space:
        *path, leaf = key.split(".")
        node = yaml.safe_load((study / "best_config.yaml").read_text())
        for part in path:
            node = node[part]
        assert node[leaf] == summary["best"][key]

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("vqtok.kind") == "tune"]
    assert len(parents) == 1
    parent = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 2 and len(runs) == 3
    assert {c.info.run_name for c in children} == {r["trial_id"] for r in rows}
    # a trial that ran every step is FINISHED with its model, even when ASHA stopped it at
    # its last report (it exports before that report); only one stopped earlier is KILLED
    by_name = {c.info.run_name: c for c in children}
    for r in rows:
        run = by_name[r["trial_id"]]
        if r["status"] == "FINISHED":
            assert run.info.status == "FINISHED", (r, run.info.status)
            assert (study / "trials" / r["trial_id"] / "model" / "MLmodel").is_file()
        else:
            assert run.info.status == "KILLED", (r, run.info.status)
    assert all("eval/psnr" in c.data.metrics for c in children)
    assert parents[0].info.status == "FINISHED"
    assert json.loads(parents[0].data.params["tune.space"]) == tc.space
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"trials.csv", "trials.json", "best_config.yaml"} <= artifacts
    # the winner: its model URI on the parent, loadable as printed, and registered
    import mlflow

    uri = summary["best_model"]
    assert parents[0].data.tags["vqtok.best_model"] == uri
    assert parents[0].data.metrics["best/eval/psnr"] == summary["best"]["eval/psnr"]
    with pytest.MonkeyPatch.context() as mp:  # not mlflow.set_tracking_uri: it would leak
        mp.setenv("MLFLOW_TRACKING_URI", summary["tracking_uri"])  # into later tests
        assert mlflow.pyfunc.load_model(uri) is not None
    assert summary["registered"] == "models:/looc-tuned/1"

    # a trial ASHA stopped must not keep its CPUs (its placement group is freed). Ray frees
    # placement groups asynchronously (30 s was once not enough on 2 loaded cores); a group
    # that stays is a leak: one did while trials still restarted their worker group (see
    # pipelines/studies/tune_trial.py)
    for _ in range(90):
        if ray.available_resources().get("CPU", 0) >= 2 - 1e-6:
            break
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) >= 2 - 1e-6, ray.available_resources()
