"""Hostile and broken shards: every bad sample is skipped and counted, nothing is written
outside the run, nothing crashes, memory stays bounded; on the plain iterator, on Ray Data
and in `vqtok inspect`.

The fuzzed shard set is real tar files on disk (written with `tarfile`, then cut or
patched byte by byte) holding real H.264, PNG and JPEG bytes: hostile member names
(`../evil.mp4`, `/abs/x.png`, `a/../../b.jpg`, non-UTF-8, a newline), links and device
members, an oversized member, mismatched extensions, decompression-bomb PNG headers, tars
cut at several offsets, a header declaring 2**40 bytes, a size that swallows the next
header, gzip and random bytes named `.tar`, and broken keys.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import resource
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main as cli_main
from pipelines.data.batches import DataConfig
from pipelines.data.decode import BadSample, decode_video
from pipelines.data.inspect import inspect_shards
from pipelines.data.ray_dataset import build_dataset
from pipelines.data.shards import encode_h264
from pipelines.data.stream import BatchStream, iter_batches
from pipelines.data.tars import check_shards

MAX_MEMBER = 200_000  # bytes; the test's `max_member_bytes`
CFG = {"resolutions": ((32, 32),), "frame_counts": (4,), "batch_size": 4, "min_frames": 1}


def _clip(seed: int, frames: int = 6) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.kron(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    return encode_h264([np.roll(base, t, axis=1) for t in range(frames)], fps=10)


def _image(fmt: str, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR declares `width` x `height` 8-bit grey pixels; the pixel data is
    `idat` (zlib), far too short for that size: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat or zlib.compress(b"\0" * 4096))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def _meta(frames: int = 6, h: int = 32, w: int = 32) -> bytes:
    meta = {"source": "fuzz", "fps": 10.0, "frames": frames, "height": h, "width": w}
    return json.dumps(meta).encode()


def _write_tar(path: Path, members: list) -> None:
    """`members`: (name, bytes) for a regular file, or (name, TarInfo type, linkname)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, *rest in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if len(rest) == 1:
                info.size = len(rest[0])
                tf.addfile(info, io.BytesIO(rest[0]))
            else:
                info.type, info.linkname = rest
                tf.addfile(info)


def _sample(key: str, ext: str, media: bytes, meta: bytes | None = None) -> list:
    return [(f"{key}.{ext}", media), (f"{key}.json", meta or _meta(1 if ext != "mp4" else 6))]


def _hostile_members() -> tuple[list, Counter, set[str]]:
    """The members of `hostile.tar`, the skips they must cause, and its good keys."""
    clip, png, jpg = _clip(0), _image("PNG"), _image("JPEG")
    rng = np.random.default_rng(1)
    members = [
        *_sample("g0", "mp4", clip),
        *_sample("g1", "png", png),
        ("somedir", tarfile.DIRTYPE, ""),  # a directory entry: no sample, not counted
        *_sample("../evil", "mp4", clip),
        *_sample("/abs/x", "png", png),
        *_sample("a/../../b", "jpg", jpg),
        *_sample(b"bad\xff".decode("utf-8", "surrogateescape"), "png", png),
        *_sample("new\nline", "png", png),
        ("sym.mp4", tarfile.SYMTYPE, "/etc/passwd"),
        ("sym.json", _meta()),
        ("hard.mp4", tarfile.LNKTYPE, "g0.mp4"),
        ("hard.json", _meta()),
        ("dev.mp4", tarfile.CHRTYPE, ""),
        ("fifo.png", tarfile.FIFOTYPE, ""),
        *_sample("big", "mp4", rng.integers(0, 256, MAX_MEMBER + 1, dtype=np.uint8).tobytes()),
        *_sample("empty", "mp4", b""),
        *_sample("pngasmp4", "mp4", png),
        *_sample("mp4asjpg", "jpg", clip),
        *_sample("randpng", "png", rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()),
        *_sample("randmp4", "mp4", rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()),
        *_sample("bomb", "png", _png_header(50_000, 50_000)),  # over PIL's own bomb limit
        *_sample("bomb2", "png", _png_header(12_000, 12_000)),  # over our pixel guard
        *_sample("bigtrunc", "png", _png_header(9_000, 9_000)),  # passes guards, data cut
        *_sample("g2", "jpg", jpg),
        *_sample("g3", "mp4", _clip(3)),
    ]
    skips = Counter(
        unsafe_name=5, not_regular=4, too_large=1, empty=1, not_video=2,
        undecodable_image=3, bad_dims=2,
    )  # fmt: skip
    return members, skips, {"g0", "g1", "g2", "g3"}


def _patch_size(data: bytearray, offset: int, size: int) -> None:
    """Rewrite the size field of the tar header at `offset` (base-256 when over 8 GiB)."""
    field = b"\x80" + size.to_bytes(11, "big") if size >= 8**11 else b"%011o\0" % size
    data[offset + 124 : offset + 136] = field
    data[offset + 148 : offset + 156] = b" " * 8
    data[offset + 148 : offset + 156] = b"%06o\0 " % sum(data[offset : offset + 512])


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """(shard folder, expected skips by reason, the keys to read, a key once per shard)."""
    root = tmp_path_factory.mktemp("fuzz")
    d = root / "shards"
    d.mkdir()
    members, skips, good = _hostile_members()
    _write_tar(d / "hostile.tar", members)
    clean = [m for i in range(4) for m in _sample(f"c{i}", "mp4", _clip(10 + i))]
    _write_tar(d / "clean.tar", clean)
    good |= {f"c{i}" for i in range(4)}
    data = (d / "clean.tar").read_bytes()
    infos = tarfile.open(d / "clean.tar").getmembers()
    bad = {  # name -> bytes; refused whole (bad_shard): nothing whole before the break
        "cut_empty": b"",
        "cut_in_first_header": data[:100],
        "cut_in_data_1": data[: infos[1].offset_data + 10],
        "gzip": gzip.compress(data),
        "random": np.random.default_rng(2).integers(0, 256, 20_000, dtype=np.uint8).tobytes(),
    }
    cut = {  # name -> bytes; read up to the cut (cut_shard), the sample at the cut dropped
        "cut_in_data_5": data[: infos[5].offset_data + infos[5].size // 2],  # c2.json: c0, c1
        "cut_in_header_4": data[: infos[4].offset + 300],  # tarfile ends quietly: c0
        "cut_at_member_4": data[: infos[4].offset],  # no end-of-archive marker: c0
    }
    kept = {"cut_in_data_5": ["c0", "c1"], "cut_in_header_4": ["c0"], "cut_at_member_4": ["c0"],
            "huge_size": ["c0"], "size_swallows_header": ["c0"]}  # fmt: skip
    huge, swallow = bytearray(data), bytearray(data)
    _patch_size(huge, infos[2].offset, 2**40)
    end = infos[3].offset - infos[2].offset_data  # member 2's data blocks
    _patch_size(swallow, infos[2].offset, end + 1)  # eats member 3's header
    cut |= {"huge_size": bytes(huge), "size_swallows_header": bytes(swallow)}
    for name, blob in (bad | cut).items():
        (d / f"{name}.tar").write_bytes(blob)
    _write_tar(
        d / "key_not_contiguous.tar",
        [*_sample("k", "mp4", b"x")[:1], ("j.mp4", b"y"), ("k.json", _meta())],
    )
    _write_tar(d / "duplicate_member.tar", [("k.mp4", b"x"), ("k.mp4", b"y")])
    skips["bad_shard"] = len(bad) + 2
    skips["cut_shard"] = len(cut)
    good = sorted([*good, *(k for keys in kept.values() for k in keys)])  # with repeats
    return d, skips, good


def _cfg(d: Path, **kw) -> DataConfig:
    return DataConfig(shards=(str(d),), max_member_bytes=MAX_MEMBER, **{**CFG, **kw})


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_shard_check_refuses_every_broken_tar(fuzz):
    d, skips, _ = fuzz
    check = check_shards(sorted(str(p) for p in d.glob("*.tar")))
    cut = {Path(p).stem: reason for p, reason in check.cut.items()}
    assert sorted(Path(p).stem for p in check.good) == sorted(["clean", "hostile", *cut])
    assert len(check.bad) == skips["bad_shard"] and len(cut) == skips["cut_shard"]
    assert "after 2 samples" in cut["cut_in_header_4"]  # names where it broke
    assert "1 samples before it kept" in cut["cut_in_header_4"]
    assert "cut short" in cut["huge_size"] and "1099511627776 bytes" in cut["huge_size"]
    assert check.samples[str(d / "cut_in_data_5.tar")] == 2
    why = {Path(p).stem: reason for p, reason in check.bad.items()}
    assert "0 samples before it kept" in why["cut_in_data_1"]
    assert "not a tar" in why["gzip"] and "not a tar" in why["cut_empty"]
    assert "not contiguous" in why["key_not_contiguous"]
    assert "duplicate member k.mp4" in why["duplicate_member"]
    assert (
        check.samples[str(d / "hostile.tar")] == 22
        and check.first_keys[str(d / "hostile.tar")] == "g0"
    )


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_plain_iterator_survives_fuzzed_shards(fuzz, backend, tmp_path, monkeypatch):
    d, skips, good = fuzz
    monkeypatch.chdir(tmp_path)
    before = _tree(d.parent)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    stream = iter_batches(_cfg(d, backend=backend))
    keys = [k for b in stream for k in b["keys"]]
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert sorted(keys) == sorted(good)  # each good sample exactly once
    assert stream.skipped == skips
    assert growth_mb < 500, f"peak RSS grew by {growth_mb:.0f} MB"
    assert _tree(d.parent) == before and not list(tmp_path.iterdir())
    assert not Path("/abs/x.png").exists()


def test_inspect_reports_every_skip(fuzz, tmp_path, monkeypatch, capsys):
    d, skips, good = fuzz
    monkeypatch.chdir(tmp_path)
    report = inspect_shards(_cfg(d))
    assert report["samples_read"] == len(good) and report["skipped_by_reason"] == dict(
        sorted(skips.items())
    )
    errors = report["per_shard"][str(d / "hostile.tar")]["errors"]
    assert errors[0]["reason"] == "unsafe_name" and "../evil" in errors[0]["key"]
    # the CLI, with its default member bound: the oversized member is read and is not a video
    assert (
        cli_main(
            ["inspect", str(d), "--resolution", "32x32", "--frames", "4", "--max-errors", "30"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    moved = skips - Counter(too_large=1) + Counter(not_video=1)
    assert out["samples_read"] == len(good) and out["skipped_by_reason"] == dict(
        sorted(moved.items())
    )
    assert not list(tmp_path.iterdir())


def test_video_stream_declaring_absurd_frames():
    """FFV1 frames 17000 px wide (over `MAX_SIDE`) under a JSON that says 32x32: PyAV refuses
    the stream from its header; decord decodes it at the asked size (FFmpeg bounds a frame
    to ~268M pixels)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        s = c.add_stream("ffv1", rate=10)
        s.width, s.height, s.pix_fmt = 17000, 16, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 17000, 3), np.uint8), format="rgb24")
        c.mux([*s.encode(frame), *s.encode(None)])
    with pytest.raises(BadSample) as e:
        decode_video(buf.getvalue(), [0], size=(16, 32), backend="pyav")
    assert e.value.reason == "bad_dims"
    assert decode_video(buf.getvalue(), [0], size=(16, 32), backend="decord").shape == (
        1,
        16,
        32,
        3,
    )


# ---------------------------------------------------------------- real local Ray


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from pipelines.cluster.connect import init_ray

    cwd = tmp_path_factory.mktemp("ray_cwd")
    env = dict(os.environ)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # workers inherit it: a file written by name would land here
        init_ray(num_cpus=2, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray, cwd
        ray.shutdown()
    os.environ.clear()
    os.environ.update(env)


@pytest.mark.ray
def test_ray_survives_fuzzed_shards(ray_local, fuzz):
    ray, cwd = ray_local
    d, skips, good = fuzz
    before = _tree(d.parent)
    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    assert url.startswith("127.0.0.1:"), url  # init_ray's dashboard listens on loopback only
    stream = BatchStream(build_dataset(_cfg(d)))
    keys = [k for b in stream for k in b["keys"]]
    assert sorted(keys) == sorted(good)
    assert stream.skipped == skips
    assert _tree(d.parent) == before and not any(
        p.name.startswith(("evil", "b.")) for p in cwd.rglob("*")
    )
