"""Training end to end: a real local Ray with 2 workers, real DeepSpeed (ZeRO-2 on CPU over
gloo), real decoded demo shards, a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_config
from pipelines.store import checkpoint as ckpt
from pipelines.training.launch import fit

pytestmark = [pytest.mark.ray, pytest.mark.slow]
_JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _config(shards, tmp_path, name, *extra):
    return load_config(
        "jobs/debug.yaml",
        [
            f"data.shards={json.dumps(shards['train'])}",
            f"train.eval_shards={json.dumps(shards['val'])}",
            f"run.storage={tmp_path}",
            f"run.name={name}",
            *extra,
        ],
    )


def _history(run_dir, key):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["metrics"][key]) for r in rows if key in r["metrics"]]


def _mlflow_run(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return client, client.get_run(run_id)


def _artifacts(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_pvqvae_trains_resumes_and_logs(shards, tmp_path, ray_local):
    steps = ["train.steps=20", "train.ckpt_every=10", "train.log_every=2", "optim.lr=0.003"]
    cfg = _config(shards, tmp_path, "pvq", *steps)
    fit(cfg)
    run_dir = cfg.run.run_dir
    recon = [v for _, v in _history(run_dir, "train/recon_l1")]
    assert len(recon) >= 10 and min(recon[-3:]) < recon[0], recon  # loss falls
    last = ckpt.latest(run_dir)
    assert last is not None and last.name == "step_00000020"
    assert ckpt.TrainState.from_file(last / "train_state.json").step == 20
    assert (last / "ema.pt").is_file() and (last / "codebooks" / "quantizer0").is_dir()

    # the same name again resumes at the saved step instead of starting over
    fit(_config(shards, tmp_path, "pvq", *steps[1:], "train.steps=24"))
    steps_logged = [s for s, _ in _history(run_dir, "train/recon_l1")]
    assert steps_logged[-2:] == [22, 24] and steps_logged.count(2) == 1
    assert ckpt.TrainState.from_file(ckpt.latest(run_dir) / "train_state.json").step == 24

    client, run = _mlflow_run(run_dir)
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["model.type"] == "pvqvae"
    history = client.get_metric_history(run.info.run_id, "train/total")
    assert [m.step for m in history][-1] == 24
    assert "eval/psnr" in run.data.metrics
    files = _artifacts(client, run.info.run_id)
    assert any(f.startswith("recon/") and f.endswith(".png") for f in files), files
    assert any(f.endswith("codebook.json") for f in files), files
    assert any(f.startswith("eval/") and f.endswith(".json") for f in files), files
    assert "model/MLmodel" in files and "model/artifacts/model.pt" in files, files
    assert any(f.endswith(".png") and "codebook" in f for f in files), files
    assert "plots/psnr.png" in files, files  # validation PSNR beside its references
    model_id = run.data.tags["vqtok.model_id"]  # MLflow 3's logged model, the run's output:
    outputs = {o.model_id for o in run.outputs.model_outputs}  # one per fit that ended (2)
    assert model_id in outputs and len(outputs) == 2, (model_id, outputs)


def test_looc_image_tokenizer_trains(shards, tmp_path, ray_local):
    cfg = _config(
        shards, tmp_path, "looc",
        "model={type: image_tokenizer, flavour: looc_vae_debug}",
        "data.frame_counts=[1]", "train.steps=20", "train.log_every=2", "optim.lr=0.003",
        "loss.gan_weight=0",
    )  # fmt: skip
    fit(cfg)
    recon = [v for _, v in _history(cfg.run.run_dir, "train/recon_l1")]
    assert min(recon[-3:]) < recon[0], recon
    assert ckpt.latest(cfg.run.run_dir).name == "step_00000020"


def test_hfsvq_alternates_locally(shards, tmp_path, capfd):
    """`--local`: the same loop without Ray; HFSVQ steps F_L, then F_H, on every batch. The
    progress line shows each part's loss (it printed "loss nan": HFSVQ has no train/total),
    and torch's "No CUDA runtime is found" (CPU) stays quiet."""
    cfg = _config(
        shards, tmp_path, "hfsvq",
        "model={type: hfsvq, flavour: debug}", "data.frame_counts=[1]", "train.steps=6",
        "train.log_every=2", "loss.gan_weight=0",
    )  # fmt: skip
    fit(cfg, local=True)
    rows = [json.loads(x) for x in (cfg.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*(r["metrics"] for r in rows))
    assert "train/low/total" in keys and "train/high/total" in keys
    err = capfd.readouterr().err
    assert "step 6/6  loss high " in err and " low " in err and "loss nan" not in err, err
    assert "No CUDA runtime is found" not in err


def test_vqtok_warnings_print_in_one_line():
    """Workers print vqtok's own warnings as one line (Python's default is a file:line header
    and the source line); a library's warning keeps Python's format."""
    from pipelines.tracking.progress import _format_warning

    ours = _format_warning(UserWarning("LPIPS is OFF: no weights"), UserWarning,
                             "/repo/vqcore/metrics.py", 162, "perceptual = Perceptual(c)")  # fmt: skip
    assert ours == "[vqtok] warning: LPIPS is OFF: no weights\n"
    theirs = _format_warning("old", DeprecationWarning, "/env/site-packages/ray/x.py", 3, "f()")
    assert theirs == "/env/site-packages/ray/x.py:3: DeprecationWarning: old\n  f()\n"


def test_compiled_training_equals_eager(shards, tmp_path):
    """`train.compile`: the generator and discriminator are compiled in place (Dynamo's
    "eager" backend here: its graphs without code generation, which would take minutes on
    CPU) and train to the same losses as the eager run; the exported weights keep their
    names, and the EMA that is evaluated and exported is not the compiled training model."""
    import torch

    common = ["train.steps=4", "train.log_every=1", "train.ckpt_every=4", "loss.disc_start=1"]
    eager = _config(shards, tmp_path, "eager", *common)
    fit(eager, local=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _config(shards, tmp_path, "compiled", *common, "train.compile=true",
                       "train.compile_backend=eager")  # fmt: skip
    fit(compiled, local=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # generator, disc
    for key, steps in (("train/recon_l1", 4), ("train/total", 4), ("train/d_total", 3)):
        want, got = _history(eager.run.run_dir, key), _history(compiled.run.run_dir, key)
        assert len(want) == steps and [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), key
    weights = [cfg.run.run_dir / "model" / "artifacts" / "model.pt" for cfg in (eager, compiled)]
    want, got = (torch.load(w, weights_only=True) for w in weights)
    assert list(got) == list(want)  # no "_orig_mod." prefix
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_eval_cli_writes_metrics_and_grid(shards, tmp_path):
    from pipelines.cli import main

    cfg = _config(shards, tmp_path, "tiny", "train.steps=2", "train.ckpt_every=2",
                  "loss.gan_weight=0")  # fmt: skip
    fit(cfg, local=True)
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(cfg.run.run_dir), "--data", *shards["val"],
               "--out", str(out), "--max-batches", "2"])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["eval/psnr"] < 100 and 0 <= metrics["eval/codebook_usage"] <= 1
    # two steps learn nothing: the references say so beside it (floors: test_learning.py)
    refs = {k: metrics[f"eval/reference_{k}_psnr"] for k in ("mean_colour", "rate")}
    assert refs["mean_colour"] < refs["rate"] and metrics["eval/beats_rate"] in (0.0, 1.0)
    assert (out / "recon.png").stat().st_size > 0
    import av  # the mp4 is real H.264 that decodes back to the clip's frames

    with av.open(str(out / "recon.mp4")) as f:
        assert sum(1 for _ in f.decode(video=0)) > 1


def test_zero3_with_activation_checkpointing_resumes_and_exports(shards, tmp_path):
    """ZeRO-3 partitions the parameters: the EMA (a full copy) must still track them, and a
    resume must continue from the saved step."""
    import torch

    from vqcore.models import build_model

    extra = ["train.zero_stage=3", "train.activation_checkpointing=true", "train.ckpt_every=2",
             "loss.gan_weight=0"]  # fmt: skip
    cfg = _config(shards, tmp_path, "z3", "train.steps=2", *extra)
    fit(cfg, local=True)
    fit(_config(shards, tmp_path, "z3", "train.steps=4", *extra), local=True)
    assert [s for s, _ in _history(cfg.run.run_dir, "train/recon_l1")] == [2, 4]
    model_dir = cfg.run.run_dir / "model" / "artifacts"  # an MLflow pyfunc model folder
    model = build_model(yaml.safe_load((model_dir / "model.yaml").read_text()))
    state = torch.load(model_dir / "model.pt", weights_only=True)
    model.load_state_dict(state)  # the exported EMA weights are full tensors, not shards
    first = next(iter(state.values()))
    assert first.numel() > 0 and torch.isfinite(first).all()


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.quantizer.type=nope", "nope"),
        ("optim.lr=-0.1", "optim.lr"),
        ("data.shards=[/nonexistent/*.tar]", "data.shards"),
    ],
)
def test_bad_config_fails_at_once_naming_the_key(shards, tmp_path, override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        fit(_config(shards, tmp_path, "bad", override), local=True)


def test_reusing_a_name_with_resume_never_is_an_error(shards, tmp_path):
    cfg = _config(shards, tmp_path, "once", "train.steps=2", "train.ckpt_every=2",
                  "loss.gan_weight=0")  # fmt: skip
    fit(cfg, local=True)
    again = _config(shards, tmp_path, "once", "run.resume=never")
    with pytest.raises(ConfigError, match="run.name"):
        fit(again, local=True)
    assert yaml.safe_load((cfg.run.run_dir / "config.yaml").read_text())["run"]["name"] == "once"


def test_workers_get_the_run_folder_resolved_on_the_driver(tmp_path, monkeypatch):
    """A relative `run.storage` (the demo's `runs`) must mean the driver's folder: resolved in
    a worker it put the MLflow store, metrics and model under the Ray session's directory."""
    from pipelines.training.launch import make_trainer

    monkeypatch.chdir(tmp_path)
    cfg = load_config(_JOBS / "debug.yaml", ["run.storage=runs", "run.name=rel"])
    trainer = make_trainer(cfg)
    assert trainer.train_loop_config["run"]["storage"] == str(tmp_path / "runs")
    assert load_config(_JOBS / "debug.yaml", ["run.storage=runs"]).run.storage == "runs"
