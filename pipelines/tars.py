"""Finding, checking and reading WebDataset tar shards (no Ray).

`check_shards` walks each tar's headers (cheap: data is skipped, not read) and finds what
would stop Ray's `read_webdataset` mid-run: not a tar, cut short (a member runs past the
end of the file), keys that are not contiguous, or a duplicate member in a sample.
`iter_tar_samples` groups members into samples `{"__key__", "__url__", ext: bytes}` exactly
as Ray's reader does (key = name up to the first dot of the basename).
Local paths, or any URI pyarrow can open (`s3://…`, `gs://…`).
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # the same split as Ray's reader


def split_key(name: str) -> tuple[str | None, str | None]:
    """`"dir/abc.mp4" -> ("dir/abc", "mp4")`; `(None, None)` for a name without a dot."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def list_shards(patterns: Iterable[str]) -> list[str]:
    """Expand files, folders (their `*.tar`) and globs into a sorted list; URIs pass as-is."""
    out: set[str] = set()
    for pat in patterns:
        if "://" in pat:
            out.add(pat)
        elif os.path.isdir(pat):
            out.update(os.path.join(pat, f) for f in os.listdir(pat) if f.endswith(".tar"))
        else:
            out.update(glob.glob(pat) or [pat])
    return sorted(out)


def _open(path: str):
    """A seekable binary file and its size."""
    if "://" in path:
        import pyarrow.fs

        fs, p = pyarrow.fs.FileSystem.from_uri(path)
        return fs.open_input_file(p), fs.get_file_info(p).size
    return open(path, "rb"), os.path.getsize(path)


@dataclass
class ShardCheck:
    """Result of `check_shards`: readable shards (with each one's first sample key and
    sample count) and bad ones with the reason."""

    good: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    first_keys: dict[str, str] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)


def check_shard(path: str) -> tuple[int, str | None]:
    """(samples, first key) of a readable shard; raises `ValueError(reason)` otherwise."""
    try:
        f, size = _open(path)
    except OSError as e:
        raise ValueError(f"cannot open: {e}") from None
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            raise ValueError(f"not a tar: {e}") from None
        current, first, seen, suffixes, count = None, None, set(), set(), 0
        try:
            for info in tf:
                if info.offset_data + info.size > size:
                    raise ValueError(f"cut short: {info.name} needs {info.size} bytes")
                if not info.isreg():
                    continue
                key, suffix = split_key(info.name)
                if key is None:
                    continue
                if key != current:
                    if key in seen:
                        raise ValueError(f"key {key!r} is not contiguous")
                    seen.add(key)
                    current, suffixes, count = key, set(), count + 1
                    first = first or key
                if suffix in suffixes:
                    raise ValueError(f"duplicate member {info.name!r}")
                suffixes.add(suffix)
        except tarfile.TarError as e:
            raise ValueError(f"broken tar: {e}") from None
    return count, first


def check_shards(paths: Iterable[str]) -> ShardCheck:
    """Check every shard; an empty shard is good (zero samples)."""
    result = ShardCheck()
    for path in paths:
        try:
            n, first = check_shard(path)
        except ValueError as e:
            result.bad[path] = str(e)
            continue
        result.good.append(path)
        result.samples[path] = n
        result.first_keys[path] = first or ""
    return result


def iter_tar_samples(path: str) -> Iterator[dict]:
    """Samples of one shard, streamed: `{"__key__", "__url__", <ext>: bytes, ...}`."""
    f, _ = _open(path)
    with f, tarfile.open(fileobj=f, mode="r|") as tf:
        sample: dict | None = None
        for info in tf:
            if not info.isreg():
                continue
            key, suffix = split_key(info.name)
            if key is None:
                continue
            data = tf.extractfile(info).read()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": path}
            sample[suffix] = data
        if sample is not None:
            yield sample
