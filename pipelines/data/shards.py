"""Write WebDataset shards from folders/globs of videos and images: `vqtok shards`.

A sample is `KEY.mp4` (or `KEY.png` / `KEY.jpg`) plus `KEY.json` with `source`, `fps`,
`frames`, `height`, `width`, `duration`. Keys carry no dots (Ray's `read_webdataset` splits
keys at the first dot). Every input is probed through the training decoder first;
unreadable files are skipped and listed in `<prefix>.manifest.json` beside the shards.
mp4 inputs are stored as they are; other containers, and long videos split into clips of at
most `clip_seconds`, are re-encoded to H.264 (PyAV/libx264).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipelines.data.decode import (
    BadSample,
    decode_image,
    decode_video,
    image_size,
    rgb_converter,
    sniff,
)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".gif", ".mov")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def find_inputs(inputs: Iterable[str]) -> list[tuple[Path, str]]:
    """Expand folders (recursively) and globs into `(file, name relative to its root)`,
    keeping only video/image suffixes; sorted and de-duplicated."""
    found: dict[Path, str] = {}
    suffixes = VIDEO_SUFFIXES + IMAGE_SUFFIXES
    for item in inputs:
        paths = [Path(p) for p in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for p in paths:
            if p.is_dir():
                for f in sorted(p.rglob("*")):
                    if f.is_file() and f.suffix.lower() in suffixes:
                        found.setdefault(f.resolve(), str(f.relative_to(p)))
            elif p.suffix.lower() in suffixes:
                found.setdefault(p.resolve(), p.name)
    return sorted(found.items(), key=lambda kv: (kv[1], str(kv[0])))


def make_key(name: str, path: str | Path = "") -> str:
    """A dot-free, tar-safe key from a relative name, made unique by a short path hash."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(name)[0]).strip("_")[:64]
    digest = hashlib.sha1(str(path or name).encode()).hexdigest()[:8]
    return f"{stem or 'sample'}_{digest}"


def encode_h264(frames: Iterable[np.ndarray], fps: float, crf: int = 23, threads: int = 1) -> bytes:
    """Encode uint8 `(H, W, 3)` frames to an H.264 mp4 (yuv420p, faststart) in memory.
    Odd sizes are cropped to even; `threads=1` (with x264's `cpu-independent`, always on)
    makes the bytes reproducible."""
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("no frames to encode")
    # faststart (index before the data) needs a second pass over a real file.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        _encode_to(path, itertools.chain([first], it), fps, crf, threads)
        with open(path, "rb") as f:
            return f.read()


def _encode_to(path: str, frames: Iterable[np.ndarray], fps: float, crf: int, threads: int) -> None:
    import av

    with av.open(path, mode="w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = None
        for frame in frames:
            h, w = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2
            if stream is None:
                rate = Fraction(fps).limit_denominator(1001)
                stream = out.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                stream.options = {
                    "crf": str(crf),
                    "preset": "veryfast",
                    "threads": str(threads),
                    # x264's AVX-512 mbtree_propagate_list works on 8 macroblocks at a time
                    # and does not mask the lanes past a row's end: it reads leftover heap
                    # there and can add it to the MB-tree costs, so the bytes then depend on
                    # what the process allocated before. Seen with skimage's 14x25 gif (one
                    # macroblock wide). cpu-independent uses x264's C versions of the MB-tree
                    # functions instead, which also gives the same bytes on any x86 CPU.
                    "x264-params": "cpu-independent=1",
                }
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h, :w]), format="rgb24")
            out.mux(stream.encode(vf))
        out.mux(stream.encode(None))


def probe_video(data: bytes) -> dict:
    """fps, frames, height, width, duration of a video; checks frame 0 decodes through the
    training decoder. Raises `BadSample`."""
    import av

    decode_video(data, [0], size=(16, 16))  # the same path training uses
    try:
        with av.open(io.BytesIO(data)) as c:
            s = c.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 0) or 25.0
            frames = s.frames or sum(1 for p in c.demux(s) if p.size)
            h, w = s.codec_context.height, s.codec_context.width
    except Exception as e:  # noqa: BLE001
        raise BadSample("truncated", f"{type(e).__name__}: {e}"[:200]) from None
    return {
        "fps": fps,
        "frames": int(frames),
        "height": h,
        "width": w,
        "duration": round(frames / fps, 4),
    }


def _clips(path: Path, clip_seconds: float | None, crf: int) -> Iterator[tuple[bytes, float]]:
    """Re-encode a video to H.264, cut into clips of at most `clip_seconds` (streamed:
    one clip's encoder at a time); yields (mp4 bytes, start seconds)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate or s.guessed_rate or 0) or 25.0
        per = max(1, int(clip_seconds * fps)) if clip_seconds else None
        to_rgb = rgb_converter()
        frames = (to_rgb(f) for f in c.decode(s))
        for index in itertools.count():
            first = next(frames, None)
            if first is None:
                return
            rest = _take(frames, per - 1) if per else frames
            yield encode_h264(itertools.chain([first], rest), fps, crf), index * (per or 0) / fps


def _take(it: Iterator, n: int) -> Iterator:
    for _, x in zip(range(n), it):
        yield x


def prepare_file(
    path: Path, name: str, clip_seconds: float | None = None, crf: int = 23, key: str = ""
) -> list[dict]:
    """Probe one input file and turn it into samples `{key, ext, data, meta}` (key defaults
    to `make_key(name, path)`). Raises `BadSample` for unreadable input."""
    suffix, key = path.suffix.lower(), key or make_key(name, path)
    data = path.read_bytes()
    if not data:
        raise BadSample("empty")
    if suffix in IMAGE_SUFFIXES:
        h, w = image_size(data)
        decode_image(data)  # full decode: catches truncated files
        ext = {"jpeg": "jpg"}.get(sniff(data), sniff(data))
        if ext not in ("png", "jpg"):  # webp and friends are stored as png
            from PIL import Image

            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
            data, ext = buf.getvalue(), "png"
        meta = {"fps": 0.0, "frames": 1, "height": h, "width": w, "duration": 0.0}
        return [{"key": key, "ext": ext, "data": data, "meta": {"source": str(path), **meta}}]
    info = probe_video(data)
    if (
        suffix == ".mp4"
        and sniff(data) == "mp4"
        and not (clip_seconds and info["duration"] > clip_seconds)
    ):
        return [{"key": key, "ext": "mp4", "data": data, "meta": {"source": str(path), **info}}]
    out = []
    for i, (clip, start) in enumerate(_clips(path, clip_seconds, crf)):
        meta = {"source": str(path), **probe_video(clip), "start": round(start, 4)}
        out.append({"key": f"{key}_c{i:04d}", "ext": "mp4", "data": clip, "meta": meta})
    return out


def _prepare_safe(job: tuple[Path, str, float | None, int]) -> tuple[str, list[dict] | str]:
    path, name, clip_seconds, crf = job
    try:
        return str(path), prepare_file(path, name, clip_seconds, crf)
    except BadSample as e:
        return str(path), f"{e.reason}: {e.detail}" if e.detail else e.reason
    except Exception as e:  # noqa: BLE001 - one unreadable input never stops the rest
        return str(path), f"decode_error: {type(e).__name__}: {e}"[:300]


class ShardSink:
    """webdataset `ShardWriter` to `<out>/<prefix>-%06d.tar` plus the manifest's totals.
    `out` may be a URI (`s3://bucket/prefix`, any pyarrow.fs URI): each shard is written to
    a local temporary folder, uploaded when complete, and removed (one shard on disk at a
    time); the manifest goes beside the shards."""

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        max_count: int = 1000,
        max_bytes: int = 1 << 30,
    ):
        import webdataset as wds

        self.remote = str(out_dir).rstrip("/") if "://" in str(out_dir) else None
        self.out_dir = Path(tempfile.mkdtemp(prefix="vqtok-shards-") if self.remote else out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shards = prefix, []
        self.totals = Counter()
        self.skipped: list[dict] = []
        self.writer = wds.ShardWriter(
            str(self.out_dir / f"{prefix}-%06d.tar"),
            maxcount=max_count,
            maxsize=max_bytes,
            post=self._finished,
            verbose=0,
            encoder=False,
            mtime=0.0,
        )

    def _finished(self, path: str) -> None:
        if self.remote:
            upload(Path(path), f"{self.remote}/{Path(path).name}")
            os.remove(path)
        self.shards.append(path)

    def write(self, sample: dict) -> None:
        if "." in sample["key"]:
            raise ValueError(f"key {sample['key']!r} contains a dot")
        meta = sample["meta"]
        self.writer.write(
            {
                "__key__": sample["key"],
                sample["ext"]: sample["data"],
                "json": json.dumps(meta, sort_keys=True).encode(),
            }
        )
        kind = "images" if sample["ext"] in ("png", "jpg") else "videos"
        self.totals.update(
            {"samples": 1, kind: 1, "frames": meta["frames"], "bytes": len(sample["data"])}
        )
        self.totals["duration_ms"] += round(1000 * meta.get("duration", 0.0))

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})

    def close(self, inputs: int) -> dict:
        """Close the writer; write and return the manifest."""
        self.writer.close()
        by_reason = Counter(s["reason"].split(":")[0] for s in self.skipped)
        totals = dict(self.totals)
        manifest = {
            "shards": [Path(s).name for s in self.shards],
            "inputs": inputs,
            "samples": totals.get("samples", 0),
            "videos": totals.get("videos", 0),
            "images": totals.get("images", 0),
            "frames": totals.get("frames", 0),
            "bytes": totals.get("bytes", 0),
            "duration_s": totals.get("duration_ms", 0) / 1000,
            "skipped": len(self.skipped),
            "skipped_by_reason": dict(sorted(by_reason.items())),
            "skipped_files": self.skipped,
        }
        path = self.out_dir / f"{self.prefix}.manifest.json"
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        if self.remote:
            upload(path, f"{self.remote}/{path.name}")
            shutil.rmtree(self.out_dir, ignore_errors=True)
        return manifest


def upload(path: Path, uri: str) -> None:
    """Copy a local file to a URI through pyarrow.fs (the layer the readers use)."""
    import pyarrow.fs

    fs, target = pyarrow.fs.FileSystem.from_uri(uri)
    with path.open("rb") as src, fs.open_output_stream(target) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def download(uri: str, path: Path) -> Path:
    """Copy a URI's file to a local path through pyarrow.fs."""
    import pyarrow.fs

    fs, source = pyarrow.fs.FileSystem.from_uri(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(source) as src, path.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return path


def write_shards(
    inputs: Iterable[str],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    max_count: int = 1000,
    max_bytes: int = 1 << 30,
    clip_seconds: float | None = None,
    crf: int = 23,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Probe every input (in parallel processes), write the good ones as shards in input
    order, and return the manifest (also written to `<out>/<prefix>.manifest.json`)."""
    from tqdm import tqdm

    files = find_inputs(inputs)
    jobs = [(p, name, clip_seconds, crf) for p, name in files]
    sink = ShardSink(out_dir, prefix, max_count, max_bytes)
    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    bar = tqdm(total=len(jobs), unit="file", disable=not progress, desc="shards")
    # spawn, not fork: the caller may hold threads (Ray, torch) that fork would copy half-alive.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) if workers > 1 else _Inline() as pool:
        for path, result in pool.map(_prepare_safe, jobs):
            if isinstance(result, str):
                sink.skip(path, result)
            else:
                for sample in result:
                    sink.write(sample)
            bar.update(1)
    bar.close()
    return sink.close(len(jobs))


class _Inline:
    """A serial stand-in for an executor (workers=1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return map(fn, items)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="video/image files, folders or globs")
    parser.add_argument("--out", required=True, help="output folder, or a URI (s3://bucket/"
                        "prefix: each shard uploaded when complete)")  # fmt: skip
    parser.add_argument("--prefix", default="shard", help="shard name prefix")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    parser.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard")
    parser.add_argument(
        "--clip-seconds",
        type=float,
        default=None,
        help="split videos longer than this into clips (re-encodes)",
    )
    parser.add_argument("--crf", type=int, default=23, help="x264 quality for re-encodes")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    manifest = write_shards(
        args.inputs,
        args.out,
        prefix=args.prefix,
        max_count=args.max_count,
        max_bytes=int(args.max_bytes),
        clip_seconds=args.clip_seconds,
        crf=args.crf,
        workers=args.workers,
        progress=not args.no_progress,
    )
    summary = {k: v for k, v in manifest.items() if k != "skipped_files"}
    print(json.dumps(summary, indent=2))
    return 0 if manifest["samples"] else 1
