"""Frames, size and frame rate of an MP4/MOV video read from its `moov` box in Python: the
decord path's probe (`decode.VideoFile`).

decord has no header call, so its data path probed each clip with PyAV first: an FFmpeg
container open and stream-info read per sample, 10-13 % of a 256² 16-frame window's decode
CPU (BENCHMARKS.md "Data"). The sample's bytes are already in memory and ISO BMFF (ISO/IEC
14496-12) keeps what the probe needs in a few fixed-layout boxes of the first video track:

    moov / trak / mdia / hdlr   handler 'vide': the track is video
                      / mdhd    timescale
                      / minf / stbl / stsd   first sample entry's width, height (sec. 12.1.3)
                                    / stsz | stz2   sample count -> frames
                                    / stts   sample durations -> fps

Reading these takes microseconds. No maintained pure-Python library reads them without
a native dependency (pymediainfo wraps libmediainfo; hachoir parses the whole file tree),
hence these few lines. Anything this reader does not vouch for — not ISO BMFF, no `moov`
(fragmented or cut files), a count of 0, an edit list that drops samples, a malformed box —
gives `None`, and the caller asks FFmpeg (PyAV) as before, so a bad file still gets PyAV's
classification. The values equal PyAV's `stream.frames`, `codec_context.height/width` and
`average_rate` on H.264 MP4s (tests/test_data_mp4.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

_PATH = (b"mdia", b"minf", b"stbl")  # the boxes between a trak and its sample table


class _Unsure(Exception):
    """Not a layout this reader vouches for: the caller asks FFmpeg."""


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of each box in `data[start:end]`."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:  # 64-bit size follows the type
            if pos + 16 > end:
                raise _Unsure
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:  # to the end of the enclosing box
            size = end - pos
        if size < header or pos + size > end:
            raise _Unsure
        yield kind, pos + header, pos + size
        pos += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def _full_box(data: bytes, start: int, end: int, fmt: str, offset: int = 0) -> tuple:
    """Fields `fmt` of a box payload after its version/flags word (+ `offset` bytes)."""
    pos = start + 4 + offset
    if pos + struct.calcsize(fmt) > end:
        raise _Unsure
    return struct.unpack_from(fmt, data, pos)


def _video_track(data: bytes, start: int, end: int) -> tuple[int, int, int, float] | None:
    """(frames, height, width, fps) of a `trak` box's payload; None when it is not video."""
    mdia = _child(data, start, end, b"mdia")
    if mdia is None or (hdlr := _child(data, *mdia, b"hdlr")) is None:
        return None
    if _full_box(data, *hdlr, ">4s", offset=4)[0] != b"vide":
        return None
    mdhd = _child(data, *mdia, b"mdhd")
    if mdhd is None:
        raise _Unsure
    timescale = _full_box(data, *mdhd, ">I", offset=16 if data[mdhd[0]] == 1 else 8)[0]
    box = (start, end)
    for kind in _PATH:
        box = _child(data, *box, kind)
        if box is None:
            raise _Unsure
    stsd = _child(data, *box, b"stsd")
    if stsd is None:
        raise _Unsure
    entry = next(_boxes(data, stsd[0] + 8, stsd[1]), None)  # after version/flags, count
    if entry is None or entry[1] + 28 > entry[2]:
        raise _Unsure
    width, height = struct.unpack_from(">HH", data, entry[1] + 24)  # VisualSampleEntry
    if (stsz := _child(data, *box, b"stsz")) is not None:
        frames = _full_box(data, *stsz, ">I", offset=4)[0]
    elif (stz2 := _child(data, *box, b"stz2")) is not None:
        frames = _full_box(data, *stz2, ">I", offset=4)[0]
    else:
        raise _Unsure
    if not (frames and height and width) or _several_edits(data, start, end):
        raise _Unsure
    return frames, height, width, _rate(data, box, timescale)


def _rate(data: bytes, stbl: tuple[int, int], timescale: int) -> float:
    """Frames per second from the time-to-sample table (`stts`: runs of (count, delta)),
    as FFmpeg's mov demuxer sets `avg_frame_rate`: timescale / delta when one delta rules
    (one run, or a second run of one sample), else samples · timescale / their duration."""
    stts = _child(data, *stbl, b"stts")
    if stts is None or not timescale:
        return 0.0
    (n,) = _full_box(data, *stts, ">I")
    runs = _full_box(data, *stts, f">{2 * n}I", offset=4) if n else ()
    counts, deltas = runs[0::2], runs[1::2]
    if n == 1 or (n == 2 and counts[1] == 1):
        return timescale / deltas[0] if deltas[0] else 0.0
    total = sum(c * d for c, d in zip(counts, deltas))
    return sum(counts) * timescale / total if total else 0.0


def _several_edits(data: bytes, start: int, end: int) -> bool:
    """True when the track's edit list (`edts/elst`) has more than one edit: cuts FFmpeg
    applies to what it counts. One edit (e.g. the start shift a muxer writes for B-frame
    reordering) plays the whole track."""
    edts = _child(data, start, end, b"edts")
    if edts is None or (elst := _child(data, *edts, b"elst")) is None:
        return False
    return _full_box(data, *elst, ">I")[0] > 1


def probe_mp4(data: bytes) -> tuple[int, int, int, float] | None:
    """(frames, height, width, fps) of the first video track of MP4/MOV bytes, from the
    `moov` box; None when this reader cannot vouch for them (the caller probes with
    FFmpeg). Sizes are not checked here (`decode.check_dims` is the caller's)."""
    try:
        moov = _child(data, 0, len(data), b"moov")
        if moov is None:
            return None
        for kind, start, end in _boxes(data, *moov):
            if kind == b"trak" and (found := _video_track(data, start, end)) is not None:
                return found
    except (_Unsure, struct.error):
        return None
    return None
