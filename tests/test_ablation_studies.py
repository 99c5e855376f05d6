"""The ablation studies for real, tiny: the data set (split by source, sizes in a manifest,
made once and reused) and every study of jobs/ run end to end at its `tiny` scale (one seed,
2 variants, 2 steps), writing its table; one through the CLI, two runs at once, with its
MLflow runs nested under the study's parent run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipelines.config import ConfigError
from pipelines.studies.ablation import load_study, run_study
from pipelines.studies.ablation_data import ensure_ablation_data, size_summary, source_of

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "jobs" / "pvq_ablation.yaml"
TINY_DATA = {"crops_per_photo": 1, "clips_per_photo": 1}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """(overrides pointing a study at a small copy of the data, a storage folder)."""
    base = tmp_path_factory.mktemp("ablation")
    ensure_ablation_data(base / "data", **TINY_DATA)
    overrides = [f"ablation.data.out={base / 'data'}",
                 *(f"ablation.data.{k}={v}" for k, v in TINY_DATA.items())]  # fmt: skip
    return overrides, base


@pytest.mark.slow
def test_data_is_split_by_source_and_reused(tiny_data):
    _, base = tiny_data
    folder = base / "data"
    manifest = json.loads((folder / "manifest.json").read_text())
    train, val = (set(manifest["sources"][s]) for s in ("train", "val"))
    assert not train & val and {"carphone", "flower", "chelsea"} <= val
    assert {"astronaut", "china", "bigbuckbunny", "bikes", "motorcycle"} <= train
    assert len(train | val) == 23  # 20 photos + 3 real videos (the carphone pair is one)
    for split in ("train", "val"):  # every sample's source on its side only
        seen = set()
        for name in manifest[split]["shards"]:
            with tarfile.open(folder / name) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        seen.add(source_of(json.load(tar.extractfile(member))["source"]))
        assert seen == set(manifest["sources"][split]), split
    sizes = size_summary(manifest)
    assert sizes["val"]["samples"] > 0 and sizes["val"]["MB"] > 0
    assert sizes["train"]["images"] == 16  # 1 crop of each train photo
    assert sizes["train"]["videos"] > 18 and sizes["val"]["MB"] > 0
    assert source_of("carphone_distorted.mp4") == source_of("carphone_pristine.mp4")
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert ensure_ablation_data(folder, **TINY_DATA) == manifest  # reused, not rewritten
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="was made with"):
        ensure_ablation_data(folder, crops_per_photo=2, clips_per_photo=1)


STUDIES = {  # study file -> the 2 variants the test runs, and what its table must show
    "ablate_pvq_freq": (["full", "no_both"], ["pyramid(lfq d=16) ×3 w/o FFT+DWT", "| full > no_both | PSNR dB ↑ |"]),
    "ablate_looc": (["m4", "vqvae"], ["| looc K=64 d=4 α=2 |", "| m4 > vqvae | usage ↑ |"]),
    "ablate_hrvq": (["hrvq_l2", "vq_256"], ["| hrvq K=16 ×2 |", "| hrvq_l2 > vq_256 | MSE ↓ |"]),
    "ablate_hfsvq": (["low_only", "s4"], ["F_L vq K=64 + F_H pq K=16 S=4", "| s4 > low_only | PSNR dB ↑ |"]),
    "ablate_pvq_teacher": (["none", "contrastive"], ["+ teacher contrastive ×0.1 |", "| contrastive > none | HF-band MSE ↓ |"]),
}  # fmt: skip
METRICS = {  # per study: metrics every run must have (beyond eval/psnr)
    "ablate_pvq_freq": {"eval/ssim", "eval/hf_mse", "train/total"},
    "ablate_looc": {"eval/quantizer_usage", "eval/codebook_params"},
    "ablate_hrvq": {"eval/mse", "eval/quantizer_usage", "eval/encode_ms", "eval/quantize_ms"},
    "ablate_hfsvq": {"eval/hf_mse", "eval/encode_ms"},
    "ablate_pvq_teacher": {"eval/ssim", "eval/hf_mse"},
}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(STUDIES))
def test_study_runs_at_tiny_scale(name, tiny_data):
    overrides, base = tiny_data
    variants, expected = STUDIES[name]
    study = load_study(ROOT / "jobs" / f"{name}.yaml", [*overrides, f"run.storage={base}/runs"],
                       scale="tiny", variants=variants)  # fmt: skip
    result = run_study(study, local=True, command=f"vqtok ablate jobs/{name}.yaml --scale tiny")
    assert [r["variant"] for r in result["runs"]] == variants
    assert not any(r.get("error") or r.get("extra_error") for r in result["runs"]), result["runs"]
    for r in result["runs"]:
        assert r["metrics"]["eval/psnr"] > 0 and METRICS[name] <= set(r["metrics"]), r["metrics"]
    table = (study.folder / "results.md").read_text()
    for text in expected:
        assert text in table, table
    assert (
        json.loads((study.folder / "results.json").read_text())["summary"][0]["variant"]
        == variants[0]
    )
    if name == "ablate_hrvq":  # usage of each layer's code paths
        l2 = next(r for r in result["runs"] if r["variant"] == "hrvq_l2")
        assert {"eval/quantizer_usage_layer1", "eval/quantizer_usage_layer2"} <= set(l2["metrics"])
        assert "| usage L2 |" in table
        # a second part (another variant) into the same folder: one table of all three
        part = load_study(ROOT / "jobs" / f"{name}.yaml", [*overrides, f"run.storage={base}/runs"],
                          scale="tiny", variants=["vq_16"])  # fmt: skip
        merged = run_study(part, local=True)
        assert [r["variant"] for r in merged["runs"]] == ["hrvq_l2", "vq_16", "vq_256"]
        assert merged["runs"][0]["metrics"] == l2["metrics"]  # kept as it was
        assert merged["variants"] == ["hrvq_l2", "vq_16", "vq_256"]
    if name == "ablate_pvq_teacher":  # the teacher trained first, then aligned to
        teacher = result["models"]["teacher"]
        assert teacher["metrics"]["eval/psnr"] > 0 and "pq" in teacher["quantizer"]
        aligned = next(r for r in result["runs"] if r["variant"] == "contrastive")
        assert aligned["metrics"]["train/teacher"] > 0
        again = run_study(study, local=True)  # the finished teacher is reused, not retrained
        assert again["models"]["teacher"]["run"] == teacher["run"]
        assert "seconds" not in again["models"]["teacher"]
    if name == "ablate_hfsvq":  # F_L alone inside the trained HFSVQ, beside the low-only run
        s4 = next(r for r in result["runs"] if r["variant"] == "s4")
        assert {"eval/low_psnr", "eval/low_hf_mse"} <= set(s4["metrics"])


@pytest.mark.slow
def test_data_made_with_other_arguments_fails_before_training(tiny_data, tmp_path):
    overrides, base = tiny_data
    study = load_study(ROOT / "jobs" / "ablate_hrvq.yaml",
                       [f"ablation.data.out={base / 'data'}", f"run.storage={tmp_path}"],
                       scale="tiny", variants=["vq_16"])  # fmt: skip
    with pytest.raises(ConfigError, match="was made with"):
        run_study(study, local=True)
    assert not (tmp_path / "ablate_hrvq" / "vq_16-s0").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_study_runs_and_nests_in_mlflow(tiny_data):
    from mlflow.tracking import MlflowClient

    data, storage = tiny_data
    cmd = [
        str(Path(sys.executable).parent / "vqtok"), "ablate", str(STUDY),
        *data, f"run.storage={storage}/cli", "ablation.parallel=2",  # 2 processes at once
        "--scale", "tiny", "--variants", "vq,pvq", "--local",
    ]  # fmt: skip
    # not the process group variables an in-process run of this session left in os.environ
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    folder = storage / "cli" / "pvq_ablation"
    table = (folder / "results.md").read_text()
    # (a variant below bicubic at its rate is marked "name ↓": 2 steps are below it)
    assert re.search(r"\| vq( ↓)? \| vq K=4096 \|", table)
    assert re.search(r"\| pvq( ↓)? \| pyramid\(lfq d=16\) ×3 \|", table)
    assert "31.45 / 32.91" in table and "| pvq > vq | PSNR dB ↑ |" in table
    result = json.loads((folder / "results.json").read_text())
    assert [r["variant"] for r in result["runs"]] == ["vq", "pvq"]
    assert all(r["metrics"]["eval/psnr"] > 0 and not r.get("error") for r in result["runs"])
    assert all("eval/hf_mse" in r["metrics"] for r in result["runs"])
    assert result["data"]["val"]["sources"] >= 1 and result["seeds"] == [0]
    assert all((folder / f"{v}-s0" / "step_00000002").is_dir() for v in ("vq", "pvq"))

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pvq-ablation").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["pvq_ablation"]
    assert {by_name[v].data.tags.get("mlflow.parentRunId") for v in ("vq-s0", "pvq-s0")} == {
        parent.info.run_id
    }
    assert parent.info.status == "FINISHED" and "pvq-s0/psnr" in parent.data.metrics
    history = client.get_metric_history(parent.info.run_id, "curves/pvq-s0/train/total")
    assert sorted(m.step for m in history) == [1, 2]  # the run's own step axis
    assert "results.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
