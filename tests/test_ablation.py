"""`vqtok ablate`: the study file, the results table, and a tiny real study (2 variants ×
2 steps, one process each) whose runs nest under one MLflow parent run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.ablation import PAPER_PSNR, format_table, load_study, quantizer_label
from pipelines.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "jobs" / "pvq_ablation.yaml"


def test_study_has_the_seed_variants_and_sizes():
    study = load_study(STUDY, scale="cpu")
    assert list(study.configs) == ["vq", "gvq", "lfq", "rvq", "psvq", "rvq_lfq", "pvq"]
    assert set(study.configs) == set(PAPER_PSNR)
    q = {k: c.model["quantizer"] for k, c in study.configs.items()}
    assert q["vq"] == {"type": "vq", "codebook_size": 4096}
    assert q["gvq"] == {"type": "gvq", "codebook_size": 4096}
    assert q["psvq"]["type"] == "pyramid" and q["psvq"]["inner"]["codebook_size"] == 8000
    assert q["rvq"]["inner"]["codebook_size"] == 8000
    for name in ("lfq", "rvq_lfq", "pvq"):
        spec = q[name].get("inner", q[name])
        assert spec == {"type": "lfq", "codebook_dim": 16}
    for name, cfg in study.configs.items():  # one folder per variant under the study's
        assert cfg.run.run_dir == study.folder / name
        assert cfg.model["flavour"] == "debug" and not cfg.scaling.use_gpu
    gpu = load_study(STUDY, ["train.steps=7"], scale="gpu", variants=["pvq", "vq"])
    assert list(gpu.configs) == ["pvq", "vq"]
    assert all(c.scaling.use_gpu and c.train.steps == 7 for c in gpu.configs.values())
    assert gpu.configs["pvq"].model["flavour"] == "default"


def test_study_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="not one of"):
        load_study(STUDY, scale="tpu")
    with pytest.raises(ConfigError, match="nope"):
        load_study(STUDY, variants=["nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        STUDY.read_text().replace("vq: {type: vq, codebook_size", "vq: {type: vq, codebook_sise")
    )
    with pytest.raises(ConfigError, match="variant 'vq'.*codebook_sise"):
        load_study(bad)


def test_variant_with_more_than_a_quantizer(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        "ablation:\n  study: s\n  variants:\n"
        "    wide: {quantizer: {type: vq, codebook_size: 64}, model.latent_dim: 32}\n"
        "model: {type: pvqvae, flavour: debug}\n"
    )
    cfg = load_study(path).configs["wide"]
    assert cfg.model["latent_dim"] == 32 and cfg.model["quantizer"]["codebook_size"] == 64


def test_table_on_fixed_numbers():
    rows = [
        {"variant": "vq", "quantizer": "vq K=4096", "steps": 2, "seconds": 12.4,
         "metrics": {"eval/psnr": 21.234, "eval/ssim": 0.61234, "eval/quantizer_usage": 0.25,
                     "eval/bits_per_token": 12.0}},
        {"variant": "pvq", "quantizer": "pyramid(lfq d=16) ×3", "steps": 2, "seconds": 20.0,
         "metrics": {"eval/psnr": 23.5, "eval/ssim": 0.7, "eval/quantizer_usage": 0.125,
                     "eval/bits_per_token": 21.0}},
        {"variant": "mine", "quantizer": "fsq", "error": "RuntimeError: boom | bad"},
    ]  # fmt: skip
    assert format_table(rows) == (
        "| variant | quantizer | PSNR dB | SSIM | usage | bits/token "
        "| paper PSNR (COCO / WebVid) | steps | time s | status |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        "| vq | vq K=4096 | 21.23 | 0.6123 | 0.250 | 12.00 | 31.45 / 32.91 | 2 | 12 | ok |\n"
        "| pvq | pyramid(lfq d=16) ×3 | 23.50 | 0.7000 | 0.125 | 21.00 | 35.12 / 36.01 "
        "| 2 | 20 | ok |\n"
        "| mine | fsq | — | — | — | — | — | — | — | failed: RuntimeError: boom / bad |\n"
    )
    with_lpips = format_table([{"variant": "x", "metrics": {"eval/lpips": 0.0712}}])
    assert "| LPIPS |" in with_lpips and "0.0712" in with_lpips and "paper" not in with_lpips


def test_quantizer_labels():
    assert quantizer_label({"type": "vq", "codebook_size": 4096}) == "vq K=4096"
    assert quantizer_label({"type": "rvq", "num_quantizers": 3,
                            "inner": {"type": "vq", "codebook_size": 8000}}) == "rvq(vq K=8000) ×3"  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_study_runs_and_nests_in_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.demo_data import make_demo_data

    make_demo_data(tmp_path / "demo", crops_per_photo=1, clips_per_photo=1, max_count=8)
    cmd = [
        str(Path(sys.executable).parent / "vqtok"), "ablate", str(STUDY),
        "train.steps=2", "train.log_every=1", "train.eval_batches=1",
        f"data.shards=[{tmp_path}/demo/train-*.tar]",
        f"train.eval_shards=[{tmp_path}/demo/val-*.tar]",
        f"run.storage={tmp_path}/runs", "--variants", "vq,pvq", "--local",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    folder = tmp_path / "runs" / "pvq_ablation"
    table = (folder / "results.md").read_text()
    assert "| vq | vq K=4096 |" in table and "| pvq | pyramid(lfq d=16) ×3 |" in table
    rows = json.loads((folder / "results.json").read_text())
    assert [r["variant"] for r in rows] == ["vq", "pvq"]
    assert all(r["metrics"]["eval/psnr"] > 0 and not r.get("error") for r in rows)
    assert all((folder / v / "step_00000002").is_dir() for v in ("vq", "pvq"))

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pvq-ablation").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["pvq_ablation"]
    assert {by_name[v].data.tags.get("mlflow.parentRunId") for v in ("vq", "pvq")} == {
        parent.info.run_id
    }
    assert parent.info.status == "FINISHED" and "pvq/psnr" in parent.data.metrics
    assert "results.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
