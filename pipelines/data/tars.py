"""Finding, checking and reading WebDataset tar shards (no Ray).

`check_shards` walks each tar's headers (cheap: data is skipped, not read) and finds what
would stop a read mid-run or lose samples unseen. Refused whole: not a tar, keys that are
not contiguous, a duplicate member in a sample. Cut short (a member runs past the end of
the file, a damaged header, or no end-of-archive marker after the last member): the samples
before the cut are kept (`ShardCheck.samples`, readers stop there) and the shard is named in
`ShardCheck.cut`; the sample at the cut is dropped, as it may lack members.
`iter_tar_samples` groups members into samples `{"__key__", "__url__", ext: bytes}` exactly
as Ray's reader does (key = name up to the first dot of the basename); both data paths read
through it. Members are only ever read into memory, never extracted to disk by name. A
sample with a hostile member is yielded unread as `{"__key__", "__url__", "__skip__":
"<reason>: <detail>"}`: an absolute, `..`, non-UTF-8 or control-character name
("unsafe_name"), a link/device/fifo ("not_regular"), or one over `max_member_bytes`
("too_large"). Local paths, or any URI pyarrow can open (`s3://…`, `gs://…`).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # the same split as Ray's reader
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MAX_MEMBER_BYTES = 1 << 30  # default bound on one member read into memory


def split_key(name: str) -> tuple[str | None, str | None]:
    """`"dir/abc.mp4" -> ("dir/abc", "mp4")`; `(None, None)` for a name without a dot."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def safe_name(name: str) -> tuple[str, bool]:
    """(printable name, whether it is safe). Unsafe: absolute, a `..` component, bytes that
    are not UTF-8 (tarfile keeps them as surrogates) or control characters; the printable
    form escapes those, so it is valid UTF-8 and never holds a newline."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    text = _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    parts = re.split(r"[/\\]", name)
    unsafe = text != name or name.startswith(("/", "\\")) or ".." in parts
    return text, not unsafe


def member_problem(info: tarfile.TarInfo, max_bytes: int = MAX_MEMBER_BYTES) -> str | None:
    """Why a member must not be read, as `"<reason>: <detail>"` (reasons as in
    `decode.REASONS`), or None for a regular file of at most `max_bytes`."""
    text, safe = safe_name(info.name)
    if not safe:
        return f"unsafe_name: {text[:200]}"
    if not info.isreg():
        kind = "link" if info.issym() or info.islnk() else "special file"
        return f"not_regular: {text[:200]} is a {kind}"
    if info.size > max_bytes:
        return f"too_large: {text[:200]} is {info.size} bytes > max_member_bytes={max_bytes}"
    return None


def _keyed_members(tf: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, key, suffix) of the members that belong to a sample (directories and names
    without a dot do not), keys in their printable form."""
    for info in tf:
        if info.isdir():
            continue
        key, suffix = split_key(safe_name(info.name)[0])
        if key is not None:
            yield info, key, suffix


def list_shards(patterns: Iterable[str]) -> list[str]:
    """Expand files, folders (their `*.tar`) and globs into a sorted list, local paths and
    URIs (`s3://`, `gs://`, `file://`...: `_list_uri`) alike."""
    out: set[str] = set()
    for pat in patterns:
        if "://" in pat:
            out.update(_list_uri(pat))
        elif os.path.isdir(pat):
            out.update(os.path.join(pat, f) for f in os.listdir(pat) if f.endswith(".tar"))
        else:
            out.update(glob.glob(pat) or [pat])
    return sorted(out)


def _list_uri(pattern: str) -> list[str]:
    """A URI's shards through pyarrow.fs, the filesystem layer `_open` and Ray Data use for
    the same URIs: a glob in the last path part is matched (fnmatch) against a listing of its
    folder, a folder gives its `*.tar`, anything else passes as is (and fails when opened,
    naming itself)."""
    import pyarrow.fs

    scheme = pattern[: pattern.index("://")]
    fs, path = pyarrow.fs.FileSystem.from_uri(pattern)
    uri = lambda p: f"{scheme}://{p}"  # noqa: E731 - file:///x keeps its third slash
    folder, _, name = path.rpartition("/")
    if not any(c in name for c in "*?["):
        info = fs.get_file_info(path)
        if info.type != pyarrow.fs.FileType.Directory:
            return [pattern]
        folder, name = path.rstrip("/"), "*.tar"
    listing = fs.get_file_info(pyarrow.fs.FileSelector(folder or "/", allow_not_found=True))
    return sorted(uri(i.path) for i in listing
                  if i.type == pyarrow.fs.FileType.File and fnmatch.fnmatch(i.base_name, name))  # fmt: skip


def _open(path: str):
    """A seekable binary file and its size."""
    if "://" in path:
        import pyarrow.fs

        fs, p = pyarrow.fs.FileSystem.from_uri(path)
        return fs.open_input_file(p), fs.get_file_info(p).size
    return open(path, "rb"), os.path.getsize(path)


@dataclass
class ShardCheck:
    """Result of `check_shards`: readable shards (with each one's first sample key and the
    number of samples to read), bad ones with the reason, and the readable ones that are
    cut short with what was lost (read only up to `samples[path]`)."""

    good: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    first_keys: dict[str, str] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    cut: dict[str, str] = field(default_factory=dict)

    def limit(self, path: str) -> int | None:
        """How many samples of `path` to read: None = all; fewer for a shard cut short."""
        return self.samples[path] if path in self.cut else None


class CutShort(ValueError):
    """A tar readable up to a point: `samples` whole samples before the cut."""

    def __init__(self, message: str, samples: int, first: str | None):
        super().__init__(message)
        self.samples, self.first = samples, first


def check_shard(path: str) -> tuple[int, str | None]:
    """(samples, first key) of a readable shard; raises `CutShort` for one cut short (with
    the samples before the cut) and `ValueError(reason)` for one that cannot be read."""
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

        def cut(why: str, at_key: str | None = None) -> CutShort:
            # the sample being read at the cut may lack members, unless the cut member
            # starts a new sample
            kept = count if at_key is not None and at_key != current else max(0, count - 1)
            return CutShort(f"{why}; {kept} samples before it kept", kept, first)

        try:
            for _info, key, suffix in _keyed_members(_sized(tf, size)):
                if key != current:
                    if key in seen:
                        raise ValueError(f"key {key!r} is not contiguous")
                    seen.add(key)
                    current, suffixes, count = key, set(), count + 1
                    first = first or key
                if suffix in suffixes:
                    raise ValueError(f"duplicate member {key}.{suffix}")
                suffixes.add(suffix)
        except _Cut as e:
            raise cut(str(e), e.key) from None
        except tarfile.TarError as e:
            raise cut(f"broken tar: {e}") from None
        # tarfile ends quietly at a cut or damaged header: what follows the last member
        # must be the end-of-archive marker (zero blocks), else samples would go uncounted
        f.seek(tf.offset)
        tail = f.read(min(size - tf.offset, 1 << 16))
        if len(tail) < 512 or tail.strip(b"\0"):
            raise cut(f"cut short or damaged after {count} samples: no end-of-archive marker "
                      f"at byte {tf.offset} of {size}")  # fmt: skip
    return count, first


class _Cut(ValueError):
    def __init__(self, message: str, key: str | None):
        super().__init__(message)
        self.key = key


def _sized(tf: tarfile.TarFile, size: int) -> Iterator[tarfile.TarInfo]:
    """Members, raising `_Cut` at the first whose declared data runs past `size`."""
    for info in tf:
        if info.isreg() and info.offset_data + info.size > size:
            raise _Cut(f"cut short: {safe_name(info.name)[0]!r} needs {info.size} bytes",
                       split_key(safe_name(info.name)[0])[0])  # fmt: skip
        yield info


def check_shards(paths: Iterable[str]) -> ShardCheck:
    """Check every shard; an empty shard is good (zero samples)."""
    result = ShardCheck()
    for path in paths:
        try:
            n, first = check_shard(path)
        except CutShort as e:
            if e.samples == 0:
                result.bad[path] = str(e)
                continue
            n, first = e.samples, e.first
            result.cut[path] = str(e)
        except ValueError as e:
            result.bad[path] = str(e)
            continue
        result.good.append(path)
        result.samples[path] = n
        result.first_keys[path] = first or ""
    return result


TEXT_FIELDS = ("__key__", "__url__", "__skip__")  # a sample's str fields; members are bytes


def iter_tar_samples(
    path: str, max_member_bytes: int = MAX_MEMBER_BYTES, stream=None, limit: int | None = None
) -> Iterator[dict]:
    """Samples of one shard, streamed: `{"__key__", "__url__", <ext>: bytes, ...}`, or
    `{"__key__", "__url__", "__skip__"}` for a sample with a member `member_problem` refuses
    (none of its members is read). `stream`: an open binary file to read instead of `path`;
    `limit`: stop after that many samples (`ShardCheck.limit`: a shard cut short is read up
    to the cut, never into it)."""
    if limit is not None and limit <= 0:
        return
    f = stream if stream is not None else _open(path)[0]
    with f, tarfile.open(fileobj=f, mode="r|") as tf:
        sample: dict | None = None
        done = 0
        for info, key, suffix in _keyed_members(tf):
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                    done += 1
                    if done == limit:
                        return
                sample = {"__key__": key, "__url__": path}
            if "__skip__" in sample:
                continue
            problem = member_problem(info, max_member_bytes)
            if problem:
                sample = {"__key__": key, "__url__": path, "__skip__": problem}
            else:
                sample[suffix] = tf.extractfile(info).read()
        if sample is not None:
            yield sample
