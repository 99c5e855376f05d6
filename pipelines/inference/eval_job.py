"""`vqtok eval --model M --data SHARDS`: exact metrics of a trained model over every sample
of some shards, from Ray Data actors (`pipelines.inference.batch_infer`) or this process;
the grid and clip of the first batch; all logged to an MLflow run of experiment
`vqtok-eval` and written to `--out`. The metrics are `pipelines.inference.evaluate`'s."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipelines.inference.evaluate import EvalAccumulator, evaluate, reference_table
from pipelines.tracking.media import save_mp4, save_png
from pipelines.tracking.progress import Progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="runs:/<id>/model, models:/<name>/<version>, a run, checkpoint "
                   "(run/checkpoints/step_N) or exported model folder")  # fmt: skip
    p.add_argument("--data", nargs="+", required=True, help="shards: files, folders or globs")
    p.add_argument("--out", type=Path, default=None, help="default: <run or model folder>/eval")
    p.add_argument("--actors", type=int, default=None,
                   help="model actors of a Ray Data pipeline; 0: this process; default: 2 "
                   "when there are more than 4 shards or RAY_ADDRESS is set, else 0")  # fmt: skip
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="one GPU per actor, bf16 (default: when the Ray cluster has GPUs)")  # fmt: skip
    p.add_argument("--max-batches", type=int, default=None, help="in-process eval only")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: "
                   "MLFLOW_TRACKING_URI, else a SQLite store in --out)")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="data.key=value overrides (e.g. data.batch_size=2)")


def evaluate_sharded(loaded, shards: list[str], overrides: list[str] = (), actors: int = 2,
                     use_gpu: bool = False) -> tuple[dict, dict]:  # fmt: skip
    """Exact metrics over every sample of `shards`: per-batch states from the Ray Data
    actors (or this process, `actors=0`), merged here; media from the first batch."""
    import itertools

    from pipelines.data.stream import iter_batches
    from pipelines.data.tars import list_shards
    from pipelines.inference.batch_infer import infer, inference_data, plain_rows, unpack

    cfg = inference_data(loaded, shards, list(overrides))
    device = torch.device("cpu")
    acc = EvalAccumulator(loaded.model, device, video=loaded.video)
    rows = (plain_rows(loaded, list(shards), cfg, "eval") if actors == 0
            else infer(loaded, list(shards), cfg, "eval", actors=actors, use_gpu=use_gpu))  # fmt: skip
    samples, skipped = 0, {}
    progress = Progress("eval", total=len(list_shards(cfg.shards)))
    for row in rows:
        if row["payload"]:
            acc.merge(unpack(row["payload"]))
        samples += len(row["keys"])
        for k, v in row["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        progress.update(done=int(row["done"] >= 0), samples=len(row["keys"]))
    progress.close()
    metrics = acc.compute()
    metrics.update({"eval/samples": samples, "eval/skipped": sum(skipped.values())})
    _, media = evaluate(loaded.model, itertools.islice(iter_batches(cfg), 1), device,
                        video=loaded.video)  # fmt: skip
    return metrics, media


def run(args: argparse.Namespace) -> int:
    import os

    from pipelines.store.models import load_model
    from pipelines.tracking.tracker import Tracker

    loaded = load_model(args.model)
    actors = args.actors
    if actors is None:
        from pipelines.data.tars import list_shards

        many = len(list_shards(args.data)) > 4 or bool(os.environ.get("RAY_ADDRESS"))
        actors = 2 if many else 0
    gpu = False
    if actors:
        from pipelines.cluster.connect import cluster_has_gpus, init_ray

        init_ray()
        gpu = cluster_has_gpus() if args.gpu is None else args.gpu
    if actors == 0 and args.max_batches is not None:
        from pipelines.data.stream import iter_batches
        from pipelines.inference.batch_infer import inference_data

        cfg = inference_data(loaded, args.data, args.overrides)
        metrics, media = evaluate(loaded.model, iter_batches(cfg), torch.device("cpu"),
                                  video=loaded.video, max_batches=args.max_batches)  # fmt: skip
    else:
        metrics, media = evaluate_sharded(loaded, args.data, args.overrides, actors, gpu)
    source = Path(str(loaded.identity.get("source", "")))
    out = args.out or (source / "eval" if source.is_dir() else Path("eval"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if "grid" in media:
        save_png(media["grid"], out / "recon.png")
    if "clip" in media:
        save_mp4(media["clip"], out / "recon.mp4")
    tags = {"vqtok.kind": "eval", **{f"vqtok.model.{k}": v for k, v in loaded.identity.items()}}
    with Tracker(out, args.tracking_uri, experiment="vqtok-eval") as tracker:
        tracker.start(f"eval-{source.name or 'model'}", params={"data": list(args.data),
                      "overrides": list(args.overrides), "actors": actors}, tags=tags)  # fmt: skip
        tracker.log_metrics(metrics, step=0)
        tracker.log_dict(metrics, "eval/metrics.json")
        if "grid" in media:
            tracker.log_image(media["grid"], "recon", step=0)
    print(json.dumps(metrics, indent=1))
    print(reference_table(metrics))
    print(f"[vqtok] eval results in {out} (MLflow run {tracker.run_id})")
    return 0
