"""Shards vqtok did not write (issue 21): img2dataset's and video2dataset's layouts (their
writers are `webdataset.TarWriter` with a JSON of their own fields: img2dataset/writer.py,
video2dataset/data_writer.py), and a plain `tar` of media files with no JSON at all.
Metadata is optional: what is missing is probed from the media, what contradicts it is
corrected; every sample reads, through `vqtok inspect` and the training stream."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipelines.data.batches import DataConfig
from pipelines.data.decode import sample_meta
from pipelines.data.inspect import inspect_shards
from pipelines.data.shards import encode_h264
from pipelines.data.stream import iter_batches


def _clip(frames: int, hw=(32, 48), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    big = np.kron(rng.integers(0, 256, (hw[0] // 8, hw[1] // 8, 3), dtype=np.uint8),
                  np.ones((8, 8, 1), np.uint8))  # fmt: skip
    return encode_h264([np.roll(big, 2 * t, axis=1) for t in range(frames)], fps=10)


def _jpg(hw=(40, 60)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*hw, 3), 120, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    d = tmp_path_factory.mktemp("foreign")
    with open(d / "img2dataset.tar", "wb") as f, wds.TarWriter(f) as tw:
        for i in range(3):  # img2dataset's meta: width/height of the stored image, no frames
            meta = {"url": f"http://x/{i}.jpg", "caption": "a cat", "key": f"00000000{i}",
                    "status": "success", "error_message": None, "width": 60, "height": 40,
                    "original_width": 600, "original_height": 400, "exif": "{}"}  # fmt: skip
            tw.write({"__key__": f"00000000{i}", "jpg": _jpg(), "txt": "a cat",
                      "json": json.dumps(meta, indent=4)})  # fmt: skip
    with open(d / "video2dataset.tar", "wb") as f, wds.TarWriter(f) as tw:
        for i in range(3):  # video2dataset's meta: duration and ffprobe's streams, nested
            meta = {"url": f"http://x/{i}.mp4", "caption": "a road", "key": f"0000{i}",
                    "status": "success", "error_message": None, "duration": 0.8,
                    "video_metadata": {"streams": [{"codec_type": "video", "width": 48,
                                                     "height": 32, "nb_frames": "8"}]}}  # fmt: skip
            tw.write({"__key__": f"0000{i}", "mp4": _clip(8, seed=i), "txt": "a road",
                      "json": json.dumps(meta, indent=4)})  # fmt: skip
    with tarfile.open(d / "plain.tar", "w") as tf:  # `tar cf`: media files, no JSON
        for name, data in (("a.mp4", _clip(6, seed=5)), ("b.jpg", _jpg((48, 64)))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return d


def test_inspect_reads_every_foreign_sample_and_says_it_probed(foreign):
    cfg = DataConfig(shards=(str(foreign / "*.tar"),), resolutions=((32, 32),),
                     frame_counts=(4,), batch_size=4)  # fmt: skip
    report = inspect_shards(cfg)
    assert report["samples_read"] == 8 and report["skipped"] == 0, report["skipped_by_reason"]
    # img2dataset's JSON agrees with its images (no frames needed for an image): json; the
    # video2dataset and plain-tar samples have no usable frames/height/width: probed
    assert report["metadata"] == {"json": 3, "probed": 5}
    assert report["source_shapes_hw"] == {"32x48": 4, "40x60": 3, "48x64": 1}


def test_training_stream_reads_them(foreign):
    cfg = DataConfig(shards=(str(foreign / "*.tar"),), resolutions=((32, 32),),
                     frame_counts=(4,), batch_size=4, seed=0)  # fmt: skip
    keys, skipped = set(), 0
    for b in iter_batches(cfg):
        keys.update(b["keys"])
        skipped += sum(b["skipped"].values())
    assert len(keys) == 8 and skipped == 0


def test_metadata_that_contradicts_the_media_is_corrected():
    clip = _clip(8)
    wrong = json.dumps({"frames": 500, "height": 1000, "width": 20}).encode()
    meta, how = sample_meta(wrong, "video", clip)
    assert how == "corrected" and (meta.frames, meta.height, meta.width) == (8, 32, 48)
    right = json.dumps({"frames": 8, "height": 32, "width": 48, "fps": 10}).encode()
    assert sample_meta(right, "video", clip)[1] == "json"
    fewer = json.dumps({"frames": 4, "height": 32, "width": 48}).encode()  # a prefix: kept
    assert sample_meta(fewer, "video", clip) == (sample_meta(fewer, "video", clip)[0], "json")
    # trust_metadata: a complete JSON is used without reading the header (vqtok's own shards)
    assert sample_meta(wrong, "video", clip, trust=True)[0].frames == 500
    assert sample_meta(None, "video", clip, trust=True)[1] == "probed"
    meta, how = sample_meta(None, "image", _jpg())
    assert how == "probed" and (meta.frames, meta.height, meta.width) == (1, 40, 60)
