"""Processes this program started, found and stopped by a tag in their environment.

    env = {**os.environ, "MY_TAG": run_id}           # given to the processes we start
    tagged_pids("MY_TAG", run_id)                     # they and every descendant, any session
    stop_tagged("MY_TAG", run_id, ("/raylet", "/gcs_server"))

An environment variable survives what process groups and sessions do not: daemons that
re-parent to init, children started in new sessions (Ray's job drivers), renamed processes
(`ray::IDLE`). A fresh uuid as the value means only our processes match, so nothing else on
the machine (another user's Ray, say) is ever signalled. Linux `/proc` only.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request

__all__ = ["alive", "cmdline", "http_ok", "listening", "read_bytes", "start_time",
           "stop_tagged", "tag_values", "tagged_pids"]


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return b""


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent counts as gone)."""
    stat = read_bytes(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(b")", 1)[-1].split()[0] != b"Z"


def listening(pids: list[int]) -> list[str]:
    """The "host:port" of every TCP socket these processes listen on (gone ones skipped)."""
    import psutil

    found = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                host = c.laddr.ip.removeprefix("::ffff:")  # an IPv4 address on a dual stack
                found.add(f"{host}:{c.laddr.port}")
    return sorted(found)


def cmdline(pid: int) -> str:
    raw = read_bytes(f"/proc/{pid}/cmdline")
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def tagged_pids(name: str, value: str) -> list[int]:
    """Live processes (not this one) whose environment has `name=value`."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            if needle in read_bytes(f"/proc/{entry}/environ").split(b"\0") and alive(int(entry)):
                found.append(int(entry))
    return sorted(found)


def tag_values(name: str) -> dict[str, list[int]]:
    """{value: live pids} of every process (not this one) whose environment sets `name`."""
    prefix = f"{name}=".encode()
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            for var in read_bytes(f"/proc/{entry}/environ").split(b"\0"):
                if var.startswith(prefix) and alive(int(entry)):
                    found.setdefault(var[len(prefix):].decode(errors="replace"), []).append(
                        int(entry))
    return found


def start_time(pid: int) -> str:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with the
    pid, names one process, not a later one given the same pid; "" when it is gone."""
    stat = read_bytes(f"/proc/{pid}/stat")
    return stat.rsplit(b")", 1)[-1].split()[19].decode() if stat else ""


def _executable(pid: int) -> str:
    return cmdline(pid).split(" ")[0]


def stop_tagged(name: str, value: str, order: tuple[str, str] = ("", ""),
                grace_s: float = 15.0) -> dict:  # fmt: skip
    """SIGTERM the tagged processes in three stages: those whose executable ends with
    `order[0]`, then all but those ending with `order[1]`, then the rest (`ray stop`'s order:
    raylet, everything, GCS). Each stage waits a third of `grace_s`, then SIGKILLs what is
    left. Returns {"terminated": n, "killed": ["pid cmdline", ...]}."""
    first, last = order
    stages = (
        lambda p: bool(first) and _executable(p).endswith(first),
        lambda p: not (last and _executable(p).endswith(last)),
        lambda p: True,
    )
    done: dict = {"terminated": 0, "killed": []}
    for in_stage in stages:
        pids = [p for p in tagged_pids(name, value) if in_stage(p)]
        for sig, wait_s in ((signal.SIGTERM, grace_s / len(stages)), (signal.SIGKILL, 5.0)):
            for pid in pids:
                what = cmdline(pid)[:80]
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue
                if sig == signal.SIGTERM:
                    done["terminated"] += 1
                else:
                    done["killed"].append(f"{pid} {what}")
            deadline = time.monotonic() + wait_s
            while pids and time.monotonic() < deadline:
                time.sleep(0.2)
                pids = [p for p in pids if alive(p)]
            if not pids:
                break
    return done


def http_ok(url: str, token: str | None = None, timeout: float = 2.0) -> bool:
    """GET `url` answers 200 (with `Authorization: Bearer <token>` when given); no proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False
