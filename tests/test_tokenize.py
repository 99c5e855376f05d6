"""`vqtok tokenize` / `detokenize` / sharded `vqtok eval`: a real model logged to a real
MLflow store, loaded back by URI, real demo shards decoded by decord, a real local Ray with
two model actors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.config import ConfigError
from pipelines.inference.batch_infer import inference_data
from pipelines.inference.tokenize import (
    detokenize_sample,
    iter_token_samples,
    token_shard_name,
    tokenize,
)
from pipelines.store.models import ModelLoadError, export_model, load_model
from pipelines.tracking.tracker import Tracker
from vqcore.models import build_model

DATA = ["data.resolutions=[[32,32]]", "data.frame_counts=[4]", "data.batch_size=2"]


@pytest.fixture(scope="module")
def files(shards):
    return shards["files"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny PVQ-VAE exported and logged as training does, and registered."""
    import mlflow

    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = {"type": "pvqvae", "flavour": "debug"}
    model = build_model(cfg)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with Tracker(root, uri, experiment="tok") as tracker:
        run_id = tracker.start("tiny", params={"model": cfg})
        out = export_model(model, cfg, root / "model", {"run_id": run_id},
                           data_cfg={"resolutions": [[32, 32]], "frame_counts": [4]})  # fmt: skip
        tracker.log_model(out, "tokenizer", "model")
    model_id = mlflow.MlflowClient(uri).get_run(run_id).data.tags["vqtok.model_id"]
    with pytest.MonkeyPatch.context() as mp:  # not mlflow.set_tracking_uri: it would leak
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # into later tests' default store
        version = mlflow.register_model(f"runs:/{run_id}/model", "tiny-pvq").version
    return {"uri": uri, "run_id": run_id, "dir": root / "model", "version": version,
            "model_id": model_id}  # fmt: skip


def test_model_loads_from_every_source(logged, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])
    by_run = load_model(f"runs:/{logged['run_id']}/model")
    by_name = load_model(f"models:/tiny-pvq/{logged['version']}")
    by_dir = load_model(logged["dir"])
    by_id = load_model(f"models:/{logged['model_id']}")  # MLflow 3's logged model
    assert by_run.identity["run_id"] == by_name.identity["run_id"] == logged["run_id"]
    assert by_id.identity["weights_hash"] == by_run.identity["weights_hash"]
    assert by_run.identity["weights_hash"] == by_name.identity["weights_hash"]
    assert by_dir.identity["config_hash"] == by_run.identity["config_hash"]
    assert by_run.data["resolutions"] == [[32, 32]]
    x = torch.randint(0, 256, (2, 3, 4, 32, 32), dtype=torch.uint8)
    codes = mlflow.pyfunc.load_model(f"runs:/{logged['run_id']}/model").predict(x.numpy())
    ours = by_run.model.tokenize(x.float() / 127.5 - 1)
    assert sorted(codes) == ["l0", "l1", "l2"]
    assert all(np.array_equal(codes[f"l{i}"], c.numpy()) for i, c in enumerate(ours))
    with pytest.raises(ModelLoadError, match="not an MLflow model URI"):
        load_model(logged["dir"].parent / "nothing-here")


def test_model_is_an_mlflow_logged_model_of_its_run(logged):
    """Listed under the experiment's "Logged models", READY, with the run as its source and
    the run's output: what the MLflow UI shows and the registry takes."""
    from mlflow import MlflowClient

    client = MlflowClient(logged["uri"])
    run = client.get_run(logged["run_id"])
    [model] = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.model_id == logged["model_id"] and model.name == "tokenizer"
    files = [f.path for f in client.list_artifacts(logged["run_id"], "model")]  # the run's copy
    assert "model/MLmodel" in files, files
    assert model.source_run_id == logged["run_id"] and str(model.status) == "READY"
    assert [o.model_id for o in run.outputs.model_outputs] == [logged["model_id"]]


def test_tokenize_with_two_actors_resumes_and_detokenizes(
    files, logged, ray_local, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])
    loaded = load_model(f"runs:/{logged['run_id']}/model")
    out = tmp_path / "tokens"
    manifest = tokenize(loaded, files, out, DATA, actors=2)
    # the same stages in one process: the reference for counts and codes
    plain = tokenize(loaded, files, tmp_path / "plain", DATA, actors=0)
    assert manifest["totals"] == plain["totals"] and manifest["totals"]["samples"] > 0
    assert manifest["totals"]["shards"] == len(files)
    assert manifest["this_run"]["shards_written"] == len(files)
    assert manifest["model"]["run_id"] == logged["run_id"]

    # codes: one array per pyramid level with the latent grid's shape (time /2, space /4)
    cfg = inference_data(loaded, files, DATA)
    # (an image is one frame in a batch of its own: one latent frame)
    shapes = {t: [tuple(c.shape[1:]) for c in loaded.model.tokenize(torch.zeros(1, 3, t, 32, 32))]
              for t in (1, 4)}  # fmt: skip
    samples = [s for tar in sorted(out.glob("*.tar")) for s in iter_token_samples(tar)]
    assert len(samples) == manifest["totals"]["samples"]
    assert {info["num_frames"] for info, _ in samples} == {1, 4}
    for info, codes in samples:
        levels = shapes[1 if info["num_frames"] == 1 else 4]
        assert [tuple(codes[f"l{i}"].shape) for i in range(3)] == levels
        assert all(c.dtype == np.int32 for c in codes.values())
        assert info["model"]["weights_hash"] == loaded.identity["weights_hash"]
        assert info["source"]["meta"] is not None
    plain_samples = {i["key"]: c for t in sorted((tmp_path / "plain").glob("*.tar"))
                     for i, c in iter_token_samples(t)}  # fmt: skip
    for info, codes in samples:
        assert all(np.array_equal(codes[k], plain_samples[info["key"]][k]) for k in codes)

    # a second run writes nothing; a lost shard (crash mid-write) is the only one redone
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = tokenize(loaded, files, out, DATA, actors=2)
    assert again["this_run"]["shards_written"] == 0 and again["totals"] == manifest["totals"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    lost = sorted(out.glob("*.tar"))[0]
    lost.rename(lost.with_name(lost.name + ".partial"))  # what a killed writer leaves
    redo = tokenize(loaded, files, out, DATA, actors=0)
    assert redo["this_run"]["shards_written"] == 1 and redo["totals"] == manifest["totals"]

    # detokenize equals direct reconstruction of the same decoded clip
    from pipelines.inference.batch_infer import decode_shard

    batch = next(b for b in decode_shard(files[0], cfg) if str(b["keys"][0]))
    video = torch.from_numpy(np.asarray(batch["video"][0])).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        direct = loaded.model.eval()(video.float() / 127.5 - 1)[0]
    key = str(batch["keys"][0]).split("\n")[0]
    tar = out / token_shard_name(files[0])
    info, codes = next((i, c) for i, c in iter_token_samples(tar) if i["key"] == key)
    torch.testing.assert_close(detokenize_sample(loaded, info, codes), direct[0])


def test_detokenize_cli_writes_media(files, logged, tmp_path, capsys):
    from pipelines.cli import main

    tokens = tmp_path / "tokens"
    assert main(["tokenize", "--model", str(logged["dir"]), "--data", *files[:1],
                 "--out", str(tokens), "--actors", "0", *DATA]) == 0  # fmt: skip
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["model"]["source"] == str(logged["dir"].resolve())
    out = tmp_path / "recon"
    assert main(["detokenize", "--tokens", str(tokens), "--out", str(out)]) == 0
    written = list(out.rglob("*.mp4")) + list(out.rglob("*.png"))
    assert len(written) == manifest["totals"]["samples"]
    torch.manual_seed(1)  # tokens of one model never decode silently with another
    cfg = {"type": "pvqvae", "flavour": "debug"}
    other = export_model(build_model(cfg), cfg, tmp_path / "other")
    capsys.readouterr()
    assert main(["detokenize", "--tokens", str(tokens), "--model", str(other), "--out", str(out)]) == 2
    assert "was made by model" in capsys.readouterr().err  # one line, no traceback
    with pytest.raises(ConfigError, match="was made by model"):  # the library's error
        main(["detokenize", "--tokens", str(tokens), "--model", str(other), "--out", str(out),
              "--debug"])  # fmt: skip


def test_distributed_eval_equals_single_process(files, logged, ray_local):
    from pipelines.data.stream import iter_batches
    from pipelines.inference.eval_job import evaluate_sharded
    from pipelines.inference.evaluate import evaluate

    loaded = load_model(logged["dir"])
    two, media = evaluate_sharded(loaded, files, DATA, actors=2)
    one, _ = evaluate_sharded(loaded, files, DATA, actors=0)
    cfg = inference_data(loaded, files, DATA)
    direct, _ = evaluate(loaded.model, iter_batches(cfg), torch.device("cpu"), video=True)
    assert two["eval/samples"] == one["eval/samples"] > 0
    for key, value in direct.items():
        assert two[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        assert one[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert "grid" in media


def test_killed_tokenize_loses_only_unfinished_shards(files, logged, tmp_path):
    """SIGKILL a real `vqtok tokenize` once it has written a shard: every tar left is whole,
    and a rerun finishes with exactly the tokens of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "tokens"
    cmd = [sys.executable, "-m", "pipelines.cli", "tokenize", "--model", str(logged["dir"]),
           "--data", *files, "--out", str(out), "--actors", "0", *DATA]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    written = sorted(out.glob("*.tar"))
    assert 1 <= len(written) and not (out / "manifest.json").exists()
    for tar in written:  # whole: its stats count every sample in it
        stats = json.loads((tar.parent / f"{tar.name}.stats.json").read_text())
        assert sum(1 for _ in iter_token_samples(tar)) == stats["samples"]
    loaded = load_model(logged["dir"])
    again = tokenize(loaded, files, out, DATA, actors=0)
    assert again["this_run"]["shards_written"] == len(files) - len(written)
    fresh = tokenize(loaded, files, tmp_path / "fresh", DATA, actors=0)
    assert again["totals"] == fresh["totals"]
    for tar in sorted((tmp_path / "fresh").glob("*.tar")):
        ours = dict((i["key"], c) for i, c in iter_token_samples(out / tar.name))
        for info, codes in iter_token_samples(tar):
            assert all(np.array_equal(codes[k], ours[info["key"]][k]) for k in codes)
