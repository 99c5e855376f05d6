"""Writing shards: demo data round trip, the `vqtok shards` writer, the manifest."""

from __future__ import annotations

import json
import shutil

import pytest
import webdataset as wds

from pipelines.cli import main as cli_main
from pipelines.data.decode import BadSample, decode_image, decode_video, parse_meta
from pipelines.data.demo_data import make_demo_data, video_files
from pipelines.data.shards import find_inputs, write_shards
from pipelines.data.tars import check_shards, list_shards


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo_data(out, crops_per_photo=1, clips_per_photo=1)


def _read(paths):
    """Samples through webdataset's own reader (not ours)."""
    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False))


def test_demo_round_trip_counts_keys_metadata(demo):
    out, manifests = demo
    sources = {}
    for split, m in manifests.items():
        shards = [out / s for s in m["shards"]]
        assert shards and all(p.exists() for p in shards)
        samples = _read(shards)
        assert len(samples) == m["samples"] > 0
        assert m["skipped"] == 0 and m["videos"] > 0 and m["images"] > 0
        assert sum(1 for s in samples if "mp4" in s) == m["videos"]
        frames = 0
        for s in samples:
            key = s["__key__"]
            assert "." not in key and key.replace("_", "").replace("-", "").isalnum()
            meta = json.loads(s["json"])
            assert {"source", "fps", "frames", "height", "width", "duration"} <= set(meta)
            parse_meta(s["json"])  # valid for the training reader
            frames += meta["frames"]
            sources.setdefault(meta["source"], set()).add(split)
            if "mp4" in s:  # metadata matches the stream
                last = decode_video(s["mp4"], [meta["frames"] - 1])
                assert last.shape[1:3] == (meta["height"], meta["width"])
                with pytest.raises(BadSample):  # and not one frame more
                    decode_video(s["mp4"], [meta["frames"]])
            else:
                img = decode_image(s.get("png") or s.get("jpg"))
                assert img.shape[1:3] == (meta["height"], meta["width"])
        assert frames == m["frames"]
    assert all(len(splits) == 1 for splits in sources.values())  # split by source
    assert any("carphone" in s for s in sources) and any("pan" not in s for s in sources)
    assert {p.name for p in video_files()} <= set(sources)  # the real bundled clips


def _members(tar_path):
    """{key: {extension: bytes}} of one shard, read by webdataset."""
    samples = wds.WebDataset([str(tar_path)], shardshuffle=False, empty_check=False)
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in samples}


def test_demo_data_is_deterministic(demo, tmp_path):
    out, manifests = demo
    again = make_demo_data(tmp_path, crops_per_photo=1, clips_per_photo=1)
    for split in manifests:
        assert again[split] == manifests[split]
        for shard in manifests[split]["shards"]:
            a, b = _members(out / shard), _members(tmp_path / shard)
            assert a.keys() == b.keys()
            for key in a:  # every sample's bytes, the re-encoded gif's too
                assert a[key] == b[key], key


def test_write_shards_probes_skips_and_splits(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    vids = {p.name: p for p in video_files()}
    shutil.copy(vids["carphone_pristine.mp4"], src / "sub" / "car.v1.mp4")  # dots in name
    shutil.copy(vids["no_time_for_that_tiny.gif"], src / "anim.gif")
    (src / "empty.png").write_bytes(b"")
    (src / "garbage.mp4").write_bytes(b"\x00\x01" * 4000)
    (src / "notes.avi").write_text("not a video")
    (src / "trunc.mp4").write_bytes(vids["bikes.mp4"].read_bytes()[:30000])
    (src / "readme.txt").write_text("ignored: not media")
    assert len(find_inputs([str(src)])) == 6

    m = write_shards(
        [str(src)], tmp_path / "out", max_count=2, clip_seconds=1.5, workers=2, progress=False
    )
    reasons = {e["path"].rsplit("/", 1)[-1]: e["reason"].split(":")[0] for e in m["skipped_files"]}
    assert reasons == {
        "empty.png": "empty",
        "garbage.mp4": "not_video",
        "notes.avi": "not_video",
        "trunc.mp4": "truncated",
    }
    assert m["skipped"] == 4 and m["skipped_by_reason"]["not_video"] == 2
    samples = _read(sorted((tmp_path / "out").glob("shard-*.tar")))
    assert len(samples) == m["samples"] and len(m["shards"]) == -(-m["samples"] // 2)
    car = [s for s in samples if json.loads(s["json"])["source"].endswith("car.v1.mp4")]
    assert len(car) == 3  # 120 frames at 29.97 fps in clips of <= 1.5 s: 44 + 44 + 32
    assert [json.loads(s["json"])["frames"] for s in car] == [44, 44, 32]
    assert all("." not in s["__key__"] for s in samples)
    gif = [s for s in samples if json.loads(s["json"])["source"].endswith("anim.gif")]
    assert gif and all("mp4" in s for s in gif)  # re-encoded to H.264
    on_disk = json.loads((tmp_path / "out" / "shard.manifest.json").read_text())
    assert on_disk == m
    assert check_shards(list_shards([str(tmp_path / "out")])).bad == {}


def test_cli_shards_and_inspect(demo, tmp_path, capsys):
    out, manifests = demo
    car = next(p for p in video_files() if p.name == "carphone_distorted.mp4")
    assert cli_main(["shards", str(car), "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 1
    assert cli_main(["inspect", str(out), "--resolution", "32x32", "--frames", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    total = sum(m["samples"] for m in manifests.values())
    assert report["samples_read"] == total and report["skipped"] == 0
    assert report["batch_shapes"] and all(  # clips at T = 4; images in batches of their own
        k.endswith(("x3x4x32x32", "x3x1x32x32")) for k in report["batch_shapes"])
