"""The MP4 header reader (`pipelines.data.mp4`), decord's probe: the values FFmpeg's probe
gives, on real H.264 files, and `None` (FFmpeg decides) for what it cannot vouch for."""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import av
import numpy as np
import pytest

from pipelines.data.decode import BadSample, VideoFile, probe_video
from pipelines.data.demo_data import video_files
from pipelines.data.mp4 import probe_mp4
from pipelines.data.shards import encode_h264


def _frames(n: int, hw: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    base = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    return [np.roll(base, 3 * t, axis=1) for t in range(n)]


def _moov_last(n: int, hw: tuple[int, int], fps: Fraction) -> bytes:
    """An H.264 MP4 as a muxer writes it without faststart: `mdat` first, `moov` at the end."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = hw[1], hw[0], "yuv420p"
        for img in _frames(n, hw):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


def _clips() -> dict[str, bytes]:
    clips = {p.name: p.read_bytes() for p in video_files() if p.suffix == ".mp4"}
    for n, hw, fps in ((6, (32, 48), 10), (40, (64, 64), 25), (17, (36, 50), 30000 / 1001)):
        clips[f"faststart {n}x{hw}@{fps:.2f}"] = encode_h264(_frames(n, hw), fps=fps)
    clips["moov last"] = _moov_last(12, (48, 32), Fraction(24))
    return clips


def test_moov_reader_gives_ffmpegs_probe():
    clips = _clips()
    assert len(clips) >= 7  # the bundled clips (bikes, bigbuckbunny, carphone) and ours
    for name, data in clips.items():
        ref = probe_video(data)
        assert probe_mp4(data) == (ref.frames, ref.height, ref.width, ref.fps), name


def _set_elst_count(data: bytes, count: int) -> bytes:
    at = data.index(b"elst") + 8  # after the type and the version/flags word
    return data[:at] + struct.pack(">I", count) + data[at + 4 :]


def test_moov_reader_declines_what_it_cannot_vouch_for():
    gif = next(p for p in video_files() if p.suffix == ".gif").read_bytes()
    fast, last = encode_h264(_frames(8, (32, 32)), fps=10), _moov_last(8, (32, 32), Fraction(10))
    moov = fast.index(b"moov")
    declined = {
        "gif": gif,
        "random bytes": bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)),
        "cut before its moov": last[: len(last) // 2],
        "cut inside its moov": fast[: moov + 40],
        "an edit list of two edits": _set_elst_count(fast, 2),
    }
    for name, data in declined.items():
        assert probe_mp4(data) is None, name
    assert probe_mp4(_set_elst_count(fast, 1)) is not None  # one edit: the whole track plays


def test_decord_probe_opens_no_container(monkeypatch):
    """With decord, an MP4's probe is the header reader's (no FFmpeg open) and equals PyAV's;
    an MP4 it declines is probed by PyAV as before."""
    data = next(p for p in video_files() if p.name == "bikes.mp4").read_bytes()
    declined = _set_elst_count(encode_h264(_frames(8, (32, 32)), fps=10), 2)
    refs = {"bikes": probe_video(data), "declined": probe_video(declined)}

    def no_open(self):
        raise AssertionError("the probe opened an FFmpeg container")

    with monkeypatch.context() as m:
        m.setattr(VideoFile, "_pyav", no_open)
        with VideoFile(data, backend="decord") as video:
            assert video.probe() == refs["bikes"]
            assert video.read([0, 1], (68, 160)).shape == (2, 68, 160, 3)
        with pytest.raises(BadSample, match="opened an FFmpeg container"):  # the probe's
            VideoFile(declined, backend="decord").probe()  # failures are BadSample
    with VideoFile(declined, backend="decord") as video:
        assert video.probe() == refs["declined"]
