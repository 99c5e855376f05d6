"""`vqtok inspect SHARDS...`: read shards through the training decode path, print JSON.

Same shard check (`tars.check_shards`), same sample grouping (`tars.iter_tar_samples`) and
same per-batch decode (`data.decode_group`) as training, so what it reports as skipped is
what a run would skip. Run it before launching an expensive job.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import numpy as np

from pipelines.data.batches import DataConfig, decode_group, media_of, shard_counts
from pipelines.data.decode import BACKENDS, DEFAULT_BACKEND, IMAGE_EXTS, BadSample, sample_meta
from pipelines.data.tars import check_shards, iter_tar_samples, list_shards


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    v = np.asarray(values, dtype=np.float64)
    return {
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": round(float(v.mean()), 4),
        "total": round(float(v.sum()), 4),
    }


def inspect_shards(cfg: DataConfig, max_errors: int = 5) -> dict:
    """Decode every sample of `cfg.shards` once (epoch `cfg.epoch`, files in sorted order);
    return counts, skips by reason, per-shard errors, and shapes/durations seen."""
    t0 = time.perf_counter()
    check = check_shards(list_shards(cfg.shards))
    skipped, shapes, media, batch_shapes = Counter(), Counter(), Counter(), Counter()
    metadata = Counter()  # how each sample's metadata was had: json / probed / corrected
    frames, durations, per_shard, read = [], [], {}, 0
    skipped.update(shard_counts(check))
    for shard in check.good:
        info = {"samples": 0, "ok": 0, "skipped": Counter(), "errors": []}
        errors: list = []
        group: list[dict] = []

        def flush(group=group, info=info, errors=errors):
            for b in decode_group(group, cfg, cfg.epoch, errors):
                info["ok"] += len(b["keys"])
                info["skipped"].update(b["skipped"])
                if len(b["keys"]):
                    b_, t, h, w, c = b["video"].shape  # reported channel-first, as training sees it
                    batch_shapes[f"{b_}x{c}x{t}x{h}x{w}"] += 1
            group.clear()

        try:
            for row in iter_tar_samples(shard, cfg.max_member_bytes, limit=check.limit(shard)):
                info["samples"] += 1
                media.update(k for k in row if not k.startswith("__") and k != "json")
                try:
                    ext, data = media_of(row)
                    raw = row.get("json") if isinstance(row.get("json"), (bytes, str)) else None
                    meta, how = sample_meta(raw, "image" if ext in IMAGE_EXTS else "video", data)
                    metadata[how] += 1
                    shapes[f"{meta.height}x{meta.width}"] += 1
                    frames.append(meta.frames)
                    if meta.fps and meta.frames > 1:
                        durations.append(meta.frames / meta.fps)
                except (BadSample, TypeError, ValueError, AttributeError):
                    pass  # counted by the decode stage below
                group.append(row)
                if len(group) == cfg.batch_size:
                    flush()
            flush()
        except Exception as e:  # noqa: BLE001 - a shard that breaks mid-read
            check.bad[shard] = f"read failed: {type(e).__name__}: {e}"
            skipped["bad_shard"] += 1
        read += info["ok"]
        skipped.update(info["skipped"])
        info["skipped"] = dict(info["skipped"])
        info["errors"] = [{"key": k, "reason": r, "detail": d} for k, r, d in errors[:max_errors]]
        per_shard[shard] = info
    return {
        "shards": len(check.good) + len(check.bad),
        "bad_shards": check.bad,
        "cut_shards": check.cut,  # read up to the cut
        "samples_read": read,
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "per_shard": per_shard,
        "media": dict(sorted(media.items())),
        "metadata": dict(sorted(metadata.items())),
        "source_shapes_hw": dict(shapes.most_common()),
        "frames": _summary(frames),
        "duration_s": _summary(durations),
        "batch_shapes": dict(batch_shapes.most_common()),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _hw(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="tar shards, folders or globs")
    parser.add_argument(
        "--resolution", type=_hw, action="append", help="HxW to decode at (repeat; default 64x64)"
    )
    parser.add_argument("--frames", type=int, action="append", help="frames (default 8)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-frames", type=int, default=1)
    parser.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-errors", type=int, default=5, help="errors listed per shard")


def run(args: argparse.Namespace) -> int:
    cfg = DataConfig(
        shards=tuple(args.shards),
        resolutions=tuple(args.resolution or [(64, 64)]),
        frame_counts=tuple(args.frames or [8]),
        batch_size=args.batch_size,
        min_frames=args.min_frames,
        backend=args.backend,
        seed=args.seed,
    )
    report = inspect_shards(cfg, args.max_errors)
    print(json.dumps(report, indent=2))
    if report["samples_read"]:
        return 0
    bad = report["bad_shards"]
    why = (f"{len(bad)} of {report['shards']} shard(s) unreadable, e.g. "
           f"{next(iter(bad))}: {next(iter(bad.values()))}" if bad
           else f"no sample read from {report['shards']} shard(s): see skipped_by_reason")  # fmt: skip
    print(f"vqtok inspect: nothing read: {why}", file=sys.stderr)
    return 1
