"""Samples/s and tokens/s of `vqtok tokenize` against the model alone on the same cores.

    python -m benchmarks.tokenize_throughput [--model PATH|URI] [--clips 24] [--size 64] [--frames 8]
                                  [--actors 2] [--cpus 2]

Cases (one JSON line each), on the same demo shards (pan/zoom H.264 clips and photos):
    model_only       `batch_infer.tokenize_batch` over batches decoded beforehand (the
                     model's own speed: no tar read, no decode, no writing)
    tokenize_plain   `tokenize(actors=0)`: the same stages in one process
    tokenize_ray     `tokenize(actors=N)` on a local Ray with `--cpus` CPUs; `cold` includes
                     starting the actors, `warm` is a second run into a new folder
then `ratio_*` = pipeline samples/s / model_only samples/s. Without `--model`, an untrained
debug PVQ-VAE is exported and used (speed does not depend on the weights).
Run by hand; figures go to BENCHMARKS.md. (Not `benchmarks/tokenize.py`: run as a script,
that name would shadow the standard library's `tokenize`, which `inspect` imports.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, emit, git_rev
from pipelines.data.demo_data import make_demo_data
from pipelines.inference.batch_infer import decode_shard, inference_data, tokenize_batch
from pipelines.inference.tokenize import tokenize
from pipelines.store.models import export_model, load_model
from vqcore.models import build_model


def _model(spec: str | None, tmp: Path):
    if spec:
        return load_model(spec)
    cfg = {"type": "pvqvae", "flavour": "debug"}
    return load_model(export_model(build_model(cfg), cfg, tmp / "model"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vqtok-bench-tok-"))
    make_demo_data(tmp / "data", crops_per_photo=1, clips_per_photo=2, max_count=args.clips)
    shards = sorted(str(s) for s in (tmp / "data").glob("*.tar"))
    loaded = _model(args.model, tmp)
    overrides = [f"data.resolutions=[[{args.size},{args.size}]]",
                 f"data.frame_counts=[{args.frames}]", f"data.batch_size={args.batch}"]  # fmt: skip
    cfg = inference_data(loaded, shards, overrides)
    base = {"device": device_name(torch.device("cpu")), "git": git_rev(),
            "shape": [args.batch, 3, args.frames, args.size, args.size]}  # fmt: skip

    batches = [torch.from_numpy(r["video"][0]).permute(0, 4, 1, 2, 3)
               for s in shards for r in decode_shard(s, cfg) if r["video"][0].shape[0]]  # fmt: skip
    n = sum(b.shape[0] for b in batches)
    t0, tokens = time.perf_counter(), 0
    for b in batches:
        codes = tokenize_batch(loaded.model, b, None, torch.device("cpu"), loaded.video)
        tokens += sum(c.size for c in codes.values())
    wall = time.perf_counter() - t0
    model_rate = n / wall
    emit({"case": "model_only", **base, "samples": n, "wall_s": wall,
          "samples_per_s": model_rate, "tokens_per_s": tokens / wall})  # fmt: skip

    def run(case: str, out: Path, actors: int) -> None:
        t0 = time.perf_counter()
        m = tokenize(loaded, shards, out, overrides, actors=actors)
        wall = time.perf_counter() - t0
        rate = m["this_run"]["samples"] / wall
        emit({"case": case, **base, "actors": actors, "samples": m["this_run"]["samples"],
              "wall_s": wall, "samples_per_s": rate,
              "tokens_per_s": m["this_run"]["tokens"] / wall,
              "ratio_to_model_only": rate / model_rate,
              "skipped": m["totals"]["skipped"]})  # fmt: skip

    run("tokenize_plain", tmp / "tok_plain", 0)
    if args.actors:
        from pipelines.cluster.connect import init_ray

        init_ray(num_cpus=args.cpus, log_to_driver=False)
        run("tokenize_ray_cold", tmp / "tok_ray1", args.actors)
        run("tokenize_ray_warm", tmp / "tok_ray2", args.actors)


if __name__ == "__main__":
    main()
