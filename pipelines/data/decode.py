"""One small decoder interface for the bytes stored in shards: videos and images.

`decode_video(data, indices, size=..., backend=...)` returns only the requested frames as a
uint8 array `(T, H, W, 3)` (channel-last, as decoders produce it; `sampling` makes it
channel-first); `VideoFile` probes a video and then decodes a window of it, the training
path's order (probe, draw the window, decode it), with one container open for PyAV. Backends:
`"pyav"` (FFmpeg through PyAV, seeks for late windows) and `"decord"`
(`VideoReader(io.BytesIO(data))` + `get_batch`). A decord failure falls back to PyAV
before the sample counts as bad. `decode_image` uses PIL with a pixel-count guard.
Every failure is a `BadSample(reason)` with `reason` in `REASONS`.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pipelines.data.mp4 import probe_mp4

# The fixed set of skip reasons, counted by `data` and printed by `inspect`.
REASONS = (
    "empty",  # zero bytes
    "truncated",  # a video container that cannot be read to the frames it needs
    "not_video",  # video slot holds something else (an image, random bytes)
    "too_short",  # fewer real frames than `min_frames`
    "bad_json",  # metadata missing, not JSON, not an object, or missing fields
    "bad_dims",  # zero, negative or absurd width/height/frames (or a decompression bomb)
    "undecodable_image",  # image bytes PIL cannot decode
    "no_media",  # a sample without any video or image member
    "bad_shard",  # a shard that is not a tar, has broken keys, or is cut before its first sample
    "cut_shard",  # a shard cut short: its samples before the cut are read, counted once
    "unsafe_name",  # a tar member named absolute, with `..`, non-UTF-8 or control characters
    "not_regular",  # a tar member that is a symlink, hard link, device or fifo
    "too_large",  # a tar member over `max_member_bytes` (never read)
    "decode_error",  # anything else raised while decoding one sample
)
BACKENDS = ("pyav", "decord")
# PyAV, converting through one scaler context a clip (`rgb_converter`), decodes random 16-frame
# windows of 256² H.264 at 1.5x decord's frames/s and 1.7x its frames per CPU-second here, and
# as fast on sources 4x the training side (benchmarks/data.py; BENCHMARKS.md "Data"). decord
# (its MP4 header read in Python, PyAV behind it as the fallback) stays selectable.
DEFAULT_BACKEND = "pyav"
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "gif", "mov")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
MAX_SIDE = 16384  # larger width/height is "absurd"
MAX_PIXELS = 16384 * 16384 // 2  # PIL decompression-bomb guard (per image / frame)


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown BadSample reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Meta:
    """Validated per-sample metadata (the sample's `.json`)."""

    frames: int
    height: int
    width: int
    fps: float
    source: str = ""


def parse_meta(raw: bytes | str | dict | None, default_frames: int | None = None) -> Meta:
    """Parse and check a sample's JSON; raises `BadSample("bad_json" | "bad_dims")`.
    `default_frames`: the frame count when the JSON has none (1 for an image)."""
    try:
        obj = raw if isinstance(raw, dict) else json.loads(raw)
        if not isinstance(obj, dict):
            raise TypeError("not an object")
        if default_frames is not None:
            obj = {"frames": default_frames, **obj}
        frames, height, width = (int(obj[k]) for k in ("frames", "height", "width"))
        fps = float(obj.get("fps") or 0.0)
    except (TypeError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise BadSample("bad_json", f"{type(e).__name__}: {e}") from None
    check_dims(height, width, frames)
    return Meta(frames, height, width, fps, str(obj.get("source", "")))


def probe_video(data: bytes) -> Meta:
    """Frames, size and fps of a video from its container's stream info (PyAV: headers,
    no frame decoded): the frame count the container records, else duration × frame rate.
    Raises `BadSample` (the same size caps as metadata)."""
    with VideoFile(data, backend="pyav") as video:
        return video.probe()


def sample_meta(
    raw_json: bytes | str | None,
    kind: str,
    data: bytes,
    trust: bool = False,
    probe: Callable[[], Meta] | None = None,
) -> tuple[Meta, str]:
    """(Meta, how): the sample's metadata checked against its media. WebDataset's convention
    is that a sample is its files and metadata is optional, so shards from other tools
    (img2dataset, video2dataset, a plain tar) read too. `how`: "json" (metadata present and
    agreeing with the media), "probed" (missing or incomplete: read from the media headers),
    "corrected" (present but contradicting the media: the media's values are used).
    `trust`: a video's complete JSON is taken without reading its header ("json").
    `probe`: how a video's stream info is read (default `probe_video(data)`; the training
    path passes its open `VideoFile.probe`, so the container is parsed once)."""
    if trust and kind == "video":
        try:
            return parse_meta(raw_json), "json"
        except BadSample:
            pass
    if kind == "image":
        height, width = image_size(data)
        probed = Meta(1, height, width, 0.0, "probed")
    else:
        probed = probe() if probe is not None else probe_video(data)
    try:
        meta = parse_meta(raw_json, default_frames=1 if kind == "image" else None)
    except BadSample:
        return probed, "probed"
    same_size = (meta.height, meta.width) == (probed.height, probed.width)
    if kind == "image":
        return (meta if same_size else probed), ("json" if same_size else "corrected")
    if same_size and meta.frames <= probed.frames:
        return meta, "json"
    return Meta(probed.frames, probed.height, probed.width, meta.fps or probed.fps,
                meta.source), "corrected"  # fmt: skip


def check_dims(height: int, width: int, frames: int = 1) -> None:
    """Raise `BadSample("bad_dims")` for non-positive or absurd sizes."""
    if min(height, width, frames) <= 0 or max(height, width) > MAX_SIDE:
        raise BadSample("bad_dims", f"{width}x{height}, {frames} frames")
    if height * width > MAX_PIXELS:
        raise BadSample("bad_dims", f"{width}x{height} exceeds {MAX_PIXELS} pixels")


def sniff(data: bytes) -> str:
    """Container/image kind from magic bytes: 'mp4', 'mkv', 'avi', 'gif', 'png', 'jpg',
    'webp' or 'unknown'."""
    head = data[:16]
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "mkv"
    if head[:4] == b"RIFF":
        return {b"AVI ": "avi", b"WEBP": "webp"}.get(head[8:12], "unknown")
    if head[:4] == b"GIF8":
        return "gif"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpg"
    return "unknown"


def _classify_video_failure(data: bytes, err: Exception) -> BadSample:
    kind = sniff(data)
    if kind in ("mp4", "mkv", "avi", "gif"):
        return BadSample("truncated", f"{kind}: {type(err).__name__}: {err}"[:200])
    return BadSample("not_video", f"{kind} bytes: {type(err).__name__}"[:200])


def _pyav_meta(container) -> Meta:
    """Stream info of an open PyAV container (headers only)."""
    stream = next(s for s in container.streams if s.type == "video")
    height, width = stream.codec_context.height, stream.codec_context.width
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    frames = int(stream.frames or 0)
    if not frames and rate:
        seconds = (float(stream.duration * stream.time_base) if stream.duration
                   else (container.duration or 0) / 1e6)  # fmt: skip
        frames = round(seconds * rate)
    return Meta(frames, height, width, rate, "probed")


def rgb_converter(size: tuple[int, int] | None = None) -> Callable[..., np.ndarray]:
    """PyAV frame -> uint8 `(H, W, 3)` RGB, resized to `size=(H, W)`, through one scaler
    context and one thread for every frame it converts. `frame.to_ndarray(format="rgb24")`
    builds a context per frame and, since PyAV 17, threads it for every core (`threads=0`):
    on 128² frames that cost twice the decode itself (BENCHMARKS.md "Data"). Same pixels."""
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    kw = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
    return lambda frame: reformatter.reformat(frame, format="rgb24", threads=1, **kw).to_ndarray()


def _pyav_frames(container, indices: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Frames `indices` of an open PyAV container: seeks to the keyframe before a late
    window (frames numbered by pts), else decodes from the start to the last one needed."""
    wanted = [int(i) for i in indices]
    wanted_set, last = set(wanted), max(wanted)
    to_rgb = rgb_converter(size)
    got: dict[int, np.ndarray] = {}
    stream = container.streams.video[0]
    h0, w0 = stream.codec_context.height, stream.codec_context.width  # 0: not in header
    if h0 and w0:
        check_dims(h0, w0)  # a stream declaring absurd frames fails before any is decoded
    stream.codec_context.thread_count = 1  # one core per sample; Ray runs tasks in parallel
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    tb = float(stream.time_base or 0)
    start_pts = stream.start_time or 0
    # Late window: seek to the keyframe before it and number frames by their pts.
    if min(wanted) >= 48 and rate > 0 and tb > 0:
        target = start_pts + int(min(wanted) / rate / tb)
        container.seek(target, stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                break
            idx = round((frame.pts - start_pts) * tb * rate)
            if idx in wanted_set and idx not in got:
                got[idx] = to_rgb(frame)
            if idx >= last:
                break
        if len(got) == len(wanted_set):
            return np.stack([got[i] for i in wanted])
        got.clear()
        container.seek(start_pts, stream=stream, backward=True, any_frame=False)
    # Count frames from the start; stop at the last needed one.
    for idx, frame in enumerate(container.decode(stream)):
        if idx in wanted_set:
            got[idx] = to_rgb(frame)
        if idx >= last:
            break
    present = [i for i in wanted if i in got]
    if not present:
        raise ValueError("no frames decoded")
    return np.stack([got[i] for i in present])


def _decord_frames(data: bytes, indices: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    import decord

    h, w = size if size is not None else (-1, -1)
    vr = decord.VideoReader(io.BytesIO(data), width=int(w), height=int(h), num_threads=1)
    n = len(vr)
    present = [int(i) for i in indices if i < n]
    if not present:
        raise ValueError(f"window starts past the end ({n} frames)")
    return vr.get_batch(present).asnumpy()


class VideoFile:
    """A video's bytes, opened for the two things the data path asks of it in turn:
    `probe()` (frames, size, fps from the container headers: PyAV, no frame decoded) and
    `read(indices, size)` (those frames, resized by the decoder).

    With PyAV the probe's container is the one decoded: one open, not two (8 % of a 256²
    16-frame window's CPU; BENCHMARKS.md "Data"). decord has no header call: for an MP4 its
    probe reads the `moov` box in Python (`pipelines.data.mp4`, microseconds), anything else
    or anything that reader does not vouch for is PyAV's (probing by decoding decord's frame
    0 instead saved 7 % at the source size and lost 17 % on sources 4× the training side,
    whose windows are decoded smaller). A decord
    failure falls back to PyAV before the sample counts as bad; input that is not a known
    container goes to PyAV only (decord logs the raw bytes of unreadable input). Every
    failure is a `BadSample`. A context manager."""

    def __init__(self, data: bytes, backend: str = DEFAULT_BACKEND):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not data:
            raise BadSample("empty")
        kind = sniff(data)
        if kind in ("png", "jpg", "webp"):
            raise BadSample("not_video", f"{kind} image in a video slot")
        self.data, self.kind = data, kind
        self.backends = ["pyav"] if kind == "unknown" or backend == "pyav" else [backend, "pyav"]
        self._container = None  # the PyAV container of the probe, kept for a PyAV read
        self._meta: Meta | None = None

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def _pyav(self):
        import av

        if self._container is None:
            self._container = av.open(io.BytesIO(self.data), mode="r")
        return self._container

    def probe(self) -> Meta:
        """Frames, size and fps of the video stream; raises `BadSample` (size caps as
        `check_dims`)."""
        if self._meta is None and self.backends[0] == "decord" and self.kind == "mp4":
            if (found := probe_mp4(self.data)) is not None:
                check_dims(*found[1:3], found[0])
                self._meta = Meta(*found, "probed")
        if self._meta is None:
            try:
                meta = _pyav_meta(self._pyav())
            except StopIteration:
                raise BadSample("not_video", "no video stream") from None
            except Exception as e:  # noqa: BLE001 - FFmpeg raises many types for bad input
                raise _classify_video_failure(self.data, e) from None
            finally:
                if self.backends[0] != "pyav":
                    self.close()  # decord reads from its own reader
            check_dims(meta.height, meta.width, meta.frames)
            self._meta = meta
        return self._meta

    def read(self, indices, size: tuple[int, int] | None = None) -> np.ndarray:
        """Frames `indices` (ascending) as uint8 `(n, H, W, 3)`, resized to `size=(H, W)`;
        n < len(indices) when the stream ends early (the frames that exist, in order)."""
        indices = np.asarray(indices, dtype=np.int64)
        err: Exception = ValueError("no backend")
        for name in self.backends:
            try:
                if name == "pyav":
                    frames = _pyav_frames(self._pyav(), indices, size)
                else:
                    frames = _decord_frames(self.data, indices, size)
            except BadSample:
                raise
            except Exception as e:  # noqa: BLE001 - any decoder failure is per-sample
                err = e
                self.close()  # a container that failed mid-decode is not reused
                continue
            if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
                err = ValueError(f"decoded shape {frames.shape}")
                continue
            return frames
        raise _classify_video_failure(self.data, err)


def decode_video(
    data: bytes,
    indices,
    size: tuple[int, int] | None = None,
    backend: str = DEFAULT_BACKEND,
) -> np.ndarray:
    """Decode frames `indices` (ascending) of the video in `data`, resized to `size=(H, W)`.

    Returns uint8 `(n, H, W, 3)`; n < len(indices) when the stream ends early (the frames
    that exist, in order). decord errors fall back to PyAV; raises `BadSample`.
    """
    with VideoFile(data, backend) as video:
        return video.read(indices, size)


@contextlib.contextmanager
def _open_image(data: bytes) -> Iterator:
    """The PIL image of `data`; a decompression bomb (PIL's warning too) is `bad_dims`, any
    other failure inside the block `undecodable_image` (a `BadSample` passes through)."""
    from PIL import Image

    if not data:
        raise BadSample("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                yield img
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("bad_dims", str(e)[:200]) from None  # a bomb's header: nothing decoded
    except Exception as e:  # noqa: BLE001
        raise BadSample("undecodable_image", f"{type(e).__name__}: {e}"[:200]) from None


def image_size(data: bytes) -> tuple[int, int]:
    """(H, W) of an image from its header only; raises `BadSample`."""
    with _open_image(data) as img:
        w, h = img.size
    check_dims(h, w)
    return h, w


def decode_image(
    data: bytes,
    box: tuple[int, int, int, int] | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode an image to uint8 `(1, H, W, 3)`; optionally crop `box=(top, left, h, w)`
    and resize to `size=(H, W)` in one antialiased step. JPEGs decode at reduced scale
    (PIL draft) when the output is smaller. Raises `BadSample`."""
    from PIL import Image

    with _open_image(data) as img:
        w0, h0 = img.size
        check_dims(h0, w0)
        top, left, bh, bw = box if box is not None else (0, 0, h0, w0)
        if size is not None and img.format == "JPEG":
            # draft picks the largest 1/2^k scale that keeps the box >= size.
            scale = max(size[0] / bh, size[1] / bw)
            img.draft("RGB", (max(1, int(w0 * scale)), max(1, int(h0 * scale))))
            sx, sy = img.size[0] / w0, img.size[1] / h0
            top, left, bh, bw = top * sy, left * sx, bh * sy, bw * sx
        rgb = img.convert("RGB")
        if size is not None or box is not None:
            out_h, out_w = size if size is not None else (round(bh), round(bw))
            rgb = rgb.resize(
                (out_w, out_h),
                Image.Resampling.BILINEAR,
                box=(left, top, left + bw, top + bh),
            )
        arr = np.array(rgb, dtype=np.uint8)
    return arr[None]
