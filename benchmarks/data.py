"""Frames/s: raw decord and PyAV decode of random windows vs the full data pipeline.

Same clips for every case: H.264 pan/zoom clips over the demo photos (`--size`², `--frames`
long, `--per-shard` to a shard). A case decodes one random `--window`-frame window per clip
and delivers it at `--train-size`² (default `--size`).
    raw_<backend>           `decode.decode_video` at the source size, one process (1 core);
                            `_at_size`: scaled by the decoder (with `--train-size`)
    raw_parallel_<backend>  `--cpus` processes of raw decoding at once: what the cores
                            decode together (the machine's own scaling)
    plain_<backend>         `stream.iter_batches`: tar read + decode + crop + pad + stack
    ray_<backend>           `ray_dataset.build_dataset` through `BatchStream` on a local Ray
                            (`--cpus`); cold = first pass (worker start), warm = later passes;
                            with Ray Data's per-operator stats
    probe_ab_<backend>      probe + decode with two opens vs `decode.VideoFile`'s one, per
                            clip interleaved with raw decoding (shares of raw, CPU)
    row_cost_<backend>      per batch, the CPU a Ray task adds to the decode stage: the
                            Arrow block and the copy into the object store
    ray_threads_<backend>   more warm passes, with every thread's CPU of the driver and
                            its Ray processes from /proc (`proc_cpu`) beside `Dataset.stats()`
    train_ray               the debug PVQ-VAE on the stream, 2 Ray Train workers: the share
                            of each step spent waiting for data (`--train-steps 0`: skipped)
Prints one JSON object per case, then the ratios pipeline / raw for the same backend: each
pipeline pass follows a raw pass of the same clips, and a ratio is the median over the
pairs (`paired`; pair by pair in `ratio_to_raw_by_run`), by wall time and by CPU time (Ray's
from `Dataset.stats()`, the tasks' own CPU); `steady`: a pass's rate after its first batch.
Ray runs its workers at niceness 15 (`--worker-niceness` sets `RAY_worker_niceness`). Run by hand: `python -m
benchmarks.data`; not part of the tests. Figures and what limits them: BENCHMARKS.md "Data".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from benchmarks import proc_cpu
from pipelines.data.batches import DataConfig, iter_raw_batches, to_row
from pipelines.data.decode import VideoFile, decode_video, probe_video
from pipelines.data.demo_data import pan_zoom_frames, photos
from pipelines.data.ray_dataset import build_dataset
from pipelines.data.sampling import frame_window
from pipelines.data.shards import ShardSink, encode_h264, make_key
from pipelines.data.stream import BatchStream, iter_batches
from pipelines.data.tars import iter_tar_samples


def _rev() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "none"
        )
    except OSError:
        return "none"


def make_clips(out: Path, n: int, size: int, frames: int, per_shard: int = 8) -> list[str]:
    rng = np.random.default_rng(0)
    sink = ShardSink(out, "bench", max_count=per_shard)
    pics = list(photos().items())
    for i in range(n):
        name, img = pics[i % len(pics)]
        data = encode_h264(pan_zoom_frames(rng, img, (size, size), frames), 25.0)
        meta = {
            "source": name,
            "fps": 25.0,
            "frames": frames,
            "height": size,
            "width": size,
            "duration": frames / 25.0,
        }
        sink.write({"key": make_key(f"{name}_{i}"), "ext": "mp4", "data": data, "meta": meta})
    sink.close(n)
    return [str(p) for p in sorted(out.glob("bench-*.tar"))]


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def ray_cpu_seconds(ds) -> float:
    """CPU seconds the last execution of `ds` spent in its Ray tasks (from `ds.stats()`).

    Ray stops a block's CPU clock before the block is serialized into the object store
    (`_map_task` in ray/data/_internal/execution/operators/map_operator.py, Ray 2.60): the
    copy is not in this figure; `row_cost_case` measures it."""
    totals = re.findall(r"Remote cpu time: .*?([\d.]+)(us|ms|s) total", ds.stats())
    return sum(float(v) * _UNITS[u] for v, u in totals)


def operator_stats(text: str) -> list[dict]:
    """Per operator of the last execution (`Dataset.stats()`): its name, tasks, and the
    totals of remote wall / CPU seconds and output bytes (what each stage costs)."""
    ops = []
    for part in re.split(r"\n(?=Operator \d+ )", text):
        head = re.match(r"Operator \d+ (.+?): (\d+) tasks", part)
        if not head:
            continue
        op = {"operator": head.group(1), "tasks": int(head.group(2))}
        for key, label in (("wall_s", "Remote wall time"), ("cpu_s", "Remote cpu time")):
            m = re.search(label + r": .*?([\d.]+)(us|ms|s) total", part)
            op[key] = round(float(m.group(1)) * _UNITS[m.group(2)], 3) if m else None
        m = re.search(r"Output size bytes per block: .*?(\d+) total", part)
        op["output_bytes"] = int(m.group(1)) if m else None
        ops.append(op)
    return ops


def _timed(name: str, run_once, repeats: int, cpu_seconds=None, raw_once=None) -> dict:
    """Wall and CPU frames/s over `repeats` runs. Wall: best-of (the machine may be shared);
    CPU (this process, or `cpu_seconds()` for work done elsewhere): median.

    With `raw_once` (a raw-decode pass of the same clips, `raw_pass`), every run comes right
    after a raw pass, and `ratio_to_raw` is the median over runs of (this run / the raw pass
    just before it), by wall and by CPU: this machine's speed drifts by 10-25 % between the
    phases of one benchmark, and a pair a few seconds apart cancels most of that."""
    wall, cpu, raw_wall, raw_cpu, frames = [], [], [], [], 0
    for r in range(repeats):
        if raw_once is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            n = raw_once(r)
            raw_wall.append(n / (time.perf_counter() - t0))
            raw_cpu.append(n / max(time.process_time() - c0, 1e-9))
        t0, c0 = time.perf_counter(), time.process_time()
        frames = run_once(r)
        wall.append(frames / (time.perf_counter() - t0))
        spent = cpu_seconds() if cpu_seconds else time.process_time() - c0
        cpu.append(frames / max(spent, 1e-9))
    out = {
        "case": name,
        "frames_per_run": frames,
        "runs": repeats,
        "frames_per_s": round(max(wall), 1),
        "median_frames_per_s": round(float(np.median(wall)), 1),
        "frames_per_cpu_s": round(float(np.median(cpu)), 1),
    }
    if raw_once is not None:
        out["paired_raw"] = {"frames_per_s": round(float(np.median(raw_wall)), 1),
                             "frames_per_cpu_s": round(float(np.median(raw_cpu)), 1)}  # fmt: skip
        out["ratio_to_raw"] = {
            "frames_per_s": round(float(np.median(np.divide(wall, raw_wall))), 3),
            "frames_per_cpu_s": round(float(np.median(np.divide(cpu, raw_cpu))), 3),
        }
        # run by run: whether the pipeline warms up over the passes (e.g. Ray's object store)
        out["ratio_to_raw_by_run"] = {
            "frames_per_s": np.round(np.divide(wall, raw_wall), 3).tolist(),
            "frames_per_cpu_s": np.round(np.divide(cpu, raw_cpu), 3).tolist(),
        }
    return out


def _clip_bytes(shards: list[str]) -> list[bytes]:
    """Every clip's bytes, read once before timing (the tar read is not a raw case's cost)."""
    return [s["mp4"] for shard in shards for s in iter_tar_samples(shard)]


def raw_pass(backend: str, shards: list[str], frames: int, window: int, size=None):
    """One pass of raw decoding: one random window per clip straight from the bytes (tar
    read not timed), at the source size, or scaled by the decoder to `size` (H, W)."""
    clips = _clip_bytes(shards)
    rng = np.random.default_rng(1)

    def once(_):
        return sum(
            len(decode_video(d, frame_window(rng, frames, window), size=size, backend=backend))
            for d in clips
        )

    return once


def raw_case(
    backend: str, shards: list[str], frames: int, window: int, repeats: int, size=None
) -> dict:
    """`raw_pass` timed alone."""
    once = raw_pass(backend, shards, frames, window, size)
    return _timed(f"raw_{backend}" + ("_at_size" if size else ""), once, repeats)


def _raw_worker(backend: str, shards: list[str], frames: int, window: int) -> tuple:
    """One process's raw pass (for `raw_parallel_case`): frames, wall and CPU seconds."""
    once = raw_pass(backend, shards, frames, window)
    t0, c0 = time.perf_counter(), time.process_time()
    n = once(0)
    return n, time.perf_counter() - t0, time.process_time() - c0


def raw_parallel_case(
    backend: str, shards: list[str], frames: int, window: int, repeats: int, procs: int
) -> dict:
    """`procs` processes each running one raw pass at once: what this machine's cores
    decode together, the fair reference for a pipeline given `procs` CPUs (cores that share
    caches, memory bandwidth or a physical core decode less each than one core alone)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    wall, per_cpu = [], []
    jobs = list(zip(*[(backend, shards, frames, window)] * procs))
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
        list(pool.map(_raw_worker, *jobs))  # untimed: start the processes, warm the decoders
        for _ in range(repeats):
            t0 = time.perf_counter()
            runs = list(pool.map(_raw_worker, *jobs))
            n = sum(r[0] for r in runs)
            wall.append(n / (time.perf_counter() - t0))
            per_cpu.append(n / sum(r[2] for r in runs))
    return {
        "case": f"raw_parallel_{backend}",
        "processes": procs,
        "runs": repeats,
        "frames_per_s": round(max(wall), 1),
        "frames_per_cpu_s": round(float(np.median(per_cpu)), 1),
    }


def pipeline_case(name: str, stream_fn, repeats: int, cpu_seconds=None, raw_once=None) -> dict:
    """Real frames delivered by the pipeline per second (`num_frames` summed), and the
    median wait for the first batch of a pass (`first_batch_s`)."""
    firsts, steady = [], []

    def once(r):
        t0, frames, first = time.perf_counter(), 0, 0
        for b in stream_fn(r):
            if not frames:
                firsts.append(time.perf_counter() - t0)
                first = int(b["num_frames"].sum())
            frames += int(b["num_frames"].sum())
        steady.append((frames - first) / max(time.perf_counter() - t0 - firsts[-1], 1e-9))
        return frames

    out = _timed(name, once, repeats, cpu_seconds, raw_once)
    return {
        **out,
        "first_batch_s": round(float(np.median(firsts)), 3),
        # after the first batch: the rate a long pass approaches (no start-up, no ramp)
        "steady_frames_per_s": round(max(steady), 1),
    }


def probe_ab_case(backend: str, shards: list[str], frames: int, window: int, passes: int):
    """The decode stage's probe + decode, interleaved per clip (each clip through each way in
    turn, this process's CPU), as a share of raw decoding: `two_opens` (`probe_video`, then
    `decode_video` from a new open, the path before `VideoFile`) and `one_open` (`VideoFile`:
    probe, then read). Interleaving cancels the machine's drift between cases."""
    clips = _clip_bytes(shards)
    rng = np.random.default_rng(1)
    wins = [frame_window(rng, frames, window) for _ in clips]

    def two_opens(d, w):
        meta = probe_video(d)
        return decode_video(d, w, (meta.height, meta.width), backend)

    def one_open(d, w):
        with VideoFile(d, backend) as video:
            meta = video.probe()
            return video.read(w, (meta.height, meta.width))

    ways = {"raw": lambda d, w: decode_video(d, w, None, backend),
            "two_opens": two_opens, "one_open": one_open}  # fmt: skip
    cpu = dict.fromkeys(ways, 0.0)
    for p in range(passes):
        order = list(ways.items()) if p % 2 == 0 else list(ways.items())[::-1]
        for d, w in zip(clips, wins):
            for name, way in order:
                c0 = time.process_time()
                way(d, w)
                cpu[name] += time.process_time() - c0
    return {"case": f"probe_ab_{backend}", "clips": len(clips), "passes": passes,
            **{f"{k}/raw (frames_per_cpu_s)": round(cpu["raw"] / v, 3) for k, v in cpu.items()}}  # fmt: skip


def row_cost_case(cfg, repeats: int) -> dict:
    """What a Ray decode task does per batch beyond the plain path's decode stage, timed in
    this process (CPU ms a batch, and as a share of the decode stage): the batch made an
    Arrow block (`batches.to_row` + `BlockAccessor.batch_to_block`) and put into the object
    store (`ray.put`: one copy of the batch). Needs a running Ray."""
    import ray
    from ray.data.block import BlockAccessor

    decode = block_s = put_s = 0.0
    n = 0
    for r in range(repeats):
        batches = iter_raw_batches(cfg, r)
        while True:
            c0 = time.process_time()
            b = next(batches, None)
            if b is None:
                break
            c1 = time.process_time()
            block = BlockAccessor.batch_to_block(to_row(b))
            c2 = time.process_time()
            ray.put(block)
            c3 = time.process_time()
            decode, block_s, put_s = decode + c1 - c0, block_s + c2 - c1, put_s + c3 - c2
            n += 1
    return {
        "case": f"row_cost_{cfg.backend}",
        "batches": n,
        "decode_ms": round(1e3 * decode / n, 2),
        "to_block_ms": round(1e3 * block_s / n, 2),
        "put_ms": round(1e3 * put_s / n, 2),
        "to_block_share": round(block_s / decode, 3),
        "put_share": round(put_s / decode, 3),
    }


def ray_threads_case(name: str, ds, repeats: int, cpus: int) -> dict:
    """`repeats` warm passes of `ds` with the CPU of every thread of the driver and its Ray
    processes (`proc_cpu`; summed over the passes, by role and thread name), the share of the
    `cpus` cores each role kept busy over the passes' wall time, and the task workers' frames
    per CPU-s three ways: `Dataset.stats()`'s (a task's blocks only), all their threads over
    the whole pass, their main threads alone."""
    frames, stats_s, wall, used = 0, 0.0, 0.0, defaultdict(Counter)
    for _ in range(repeats):
        before, t0 = proc_cpu.snapshot(), time.perf_counter()
        frames += sum(int(b["num_frames"].sum()) for b in BatchStream(ds))
        wall += time.perf_counter() - t0
        stats_s += ray_cpu_seconds(ds)
        for role, threads in proc_cpu.spent(before, proc_cpu.snapshot()).items():
            used[role].update(threads)
    workers = used.get("task worker", {})
    return {
        "case": name,
        "frames": frames,
        "frames_per_cpu_s": {
            "stats": round(frames / stats_s, 1),
            "task_workers": round(frames / max(sum(workers.values()), 1e-9), 1),
            "task_workers_main_thread": round(frames / max(workers.get("main", 0.0), 1e-9), 1),
        },
        "wall_s": round(wall, 2),
        "cpu_s": {role: round(sum(t.values()), 2) for role, t in used.items()},
        "share_of_cores": {role: round(sum(t.values()) / (wall * cpus), 3)
                           for role, t in used.items()},  # fmt: skip
        "threads_cpu_s": {role: {t: round(s, 2) for t, s in threads.items() if s >= 0.01}
                          for role, threads in used.items()},  # fmt: skip
    }


def train_case(shards: list[str], tmp: str, args) -> dict:
    """The debug PVQ-VAE trained on the stream by 2 Ray Train workers (jobs/debug.yaml, 64²
    × 8-frame crops of the clips, batch 4): the share of the last log window's wall time the
    loop waited for its next batch (`train/data_wait_frac`, rank 0)."""
    from pipelines.config import load_config
    from pipelines.training.launch import fit

    steps = args.train_steps
    cfg = load_config(
        Path(__file__).parents[1] / "jobs" / "debug.yaml",
        [f"data.shards={json.dumps(shards)}", "data.resolutions=[[64, 64]]",
         "data.frame_counts=[8]", "data.batch_size=4", f"data.backend={args.backends.split(',')[-1]}",
         f"train.steps={steps}", f"train.log_every={max(1, steps // 2)}",
         f"train.ckpt_every={steps}", "train.eval_every=0", "train.eval_batches=1",
         f"train.eval_shards={json.dumps(shards[:1])}", f"run.storage={tmp}",
         "run.name=bench-train", f"run.tracking_uri=sqlite:///{tmp}/mlflow.db"],
    )  # fmt: skip
    t0 = time.perf_counter()
    metrics = fit(cfg)
    return {
        "case": "train_ray",
        "workers": cfg.scaling.num_workers,
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "clips_per_s": round(metrics.get("train/clips_per_s", float("nan")), 2),
        "data_wait_frac": round(metrics.get("train/data_wait_frac", float("nan")), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=384)
    ap.add_argument("--per-shard", type=int, default=8, help="clips per shard")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="training resolution (default --size); smaller: decoded at size",
    )
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--backends", default="pyav,decord")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument(
        "--trust-metadata",
        action="store_true",
        help="DataConfig.trust_metadata: use the shards' JSON, no container-header probe",
    )
    ap.add_argument(
        "--train-steps", type=int, default=40, help="steps of the training case (0: skip it)"
    )
    ap.add_argument(
        "--worker-niceness",
        type=int,
        default=None,
        help="RAY_worker_niceness for the Ray cases (Ray's default: 15, below this process)",
    )
    args = ap.parse_args()
    train = args.train_size or args.size
    common = {
        "clips": args.clips,
        "source": [args.frames, args.size, args.size],
        "shape": [3, args.window, train, train],
        "cpus": args.cpus,
        "trust_metadata": args.trust_metadata,
        "worker_niceness": args.worker_niceness,
        "git": _rev(),
    }
    backends = args.backends.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_clips(Path(tmp), args.clips, args.size, args.frames, args.per_shard)

        def cfg(backend):
            return DataConfig(
                shards=tuple(shards),
                resolutions=((train, train),),
                frame_counts=(args.window,),
                batch_size=args.batch_size,
                crop_scale=(1.0, 1.0),
                backend=backend,
                trust_metadata=args.trust_metadata,
            )

        for backend in backends:
            results[f"raw_{backend}"] = raw_case(
                backend, shards, args.frames, args.window, args.repeats
            )
            if train != args.size:  # what decoding at the training size saves
                results[f"raw_{backend}_at_size"] = raw_case(
                    backend, shards, args.frames, args.window, args.repeats, (train, train)
                )
            if args.cpus > 1:
                results[f"raw_parallel_{backend}"] = raw_parallel_case(
                    backend, shards, args.frames, args.window, args.repeats, args.cpus
                )
            results[f"probe_ab_{backend}"] = probe_ab_case(
                backend, shards, args.frames, args.window, args.repeats + 1
            )
            results[f"plain_{backend}"] = pipeline_case(
                f"plain_{backend}",
                lambda r, b=backend: iter_batches(cfg(b), epoch=r),
                args.repeats,
                raw_once=raw_pass(backend, shards, args.frames, args.window),
            )
        if not args.no_ray:
            import ray

            from pipelines.cluster.connect import worker_pool_env

            for key, value in worker_pool_env(args.cpus).items():  # as `init_ray` does
                os.environ.setdefault(key, value)
            if args.worker_niceness is not None:
                os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
            for backend in backends:  # a Ray of its own each: the first pass is really cold
                ray.init(
                    num_cpus=args.cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
                ray.data.DataContext.get_current().enable_progress_bars = False
                ds = build_dataset(cfg(backend))
                results[f"ray_{backend}_cold"] = pipeline_case(
                    f"ray_{backend}_cold", lambda r, d=ds: BatchStream(d), 1
                )
                results[f"ray_{backend}"] = pipeline_case(
                    f"ray_{backend}",
                    lambda r, d=ds: BatchStream(d),
                    args.repeats,
                    cpu_seconds=lambda d=ds: ray_cpu_seconds(d),
                    raw_once=raw_pass(backend, shards, args.frames, args.window),
                )
                results[f"ray_{backend}"]["operators"] = operator_stats(ds.stats())
                results[f"ray_threads_{backend}"] = ray_threads_case(
                    f"ray_threads_{backend}", ds, args.repeats, args.cpus
                )
                results[f"row_cost_{backend}"] = row_cost_case(cfg(backend), args.repeats)
                ray.shutdown()
        if args.train_steps:
            results["train_ray"] = train_case(shards, tmp, args)
    for res in results.values():
        print(json.dumps({**res, **common}))
    ratios = {}
    for metric in ("frames_per_s", "frames_per_cpu_s"):
        for backend in backends:
            for kind in ("plain", "ray"):  # paired: each pass against the raw pass before it
                if f"{kind}_{backend}" in results:
                    ratio = results[f"{kind}_{backend}"]["ratio_to_raw"][metric]
                    ratios[f"{kind}_{backend}/raw_{backend} ({metric}, paired)"] = ratio
            if metric == "frames_per_cpu_s" and f"row_cost_{backend}" in results:
                # the Ray tasks' CPU with the copy into the object store added (per batch,
                # `put_share` of the decode stage), which `Dataset.stats()` leaves out
                ratio = results[f"ray_{backend}"]["ratio_to_raw"][metric]
                put = results[f"row_cost_{backend}"]["put_share"]
                ratios[f"ray_{backend}/raw_{backend} ({metric}, paired, with the put)"] = round(
                    ratio / (1 + put), 3
                )
            if metric == "frames_per_s" and f"ray_{backend}" in results:
                ray = results[f"ray_{backend}"]
                steady = ray["steady_frames_per_s"] / ray["paired_raw"]["frames_per_s"]
                ratios[f"ray_{backend}/raw_{backend} (steady_frames_per_s)"] = round(steady, 3)
                cold = results[f"ray_{backend}_cold"]["frames_per_s"]
                ratios[f"ray_{backend}_cold/ray_{backend} (frames_per_s)"] = round(
                    cold / ray["frames_per_s"], 3
                )
            if f"raw_parallel_{backend}" in results:  # N processes at once against one alone
                par = results[f"raw_parallel_{backend}"][metric]
                ratios[f"raw_parallel_{backend}/raw_{backend} ({metric})"] = round(
                    par / results[f"raw_{backend}"][metric], 3
                )
        if "raw_pyav" in results and "raw_decord" in results:
            ratio = results["raw_pyav"][metric] / results["raw_decord"][metric]
            ratios[f"raw_pyav/raw_decord ({metric})"] = round(ratio, 3)
    print(json.dumps({"case": "ratios", **ratios, **common}))


if __name__ == "__main__":
    main()
