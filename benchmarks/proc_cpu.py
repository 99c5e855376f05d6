"""CPU seconds of every thread of this process and the processes it started (a local Ray:
GCS, raylet, workers, actors), read from /proc (Linux). `Dataset.stats()` counts a Ray task's
CPU as `time.process_time()` of its worker from the start of a block to its yield (Ray 2.60
`BlockExecStats`): every thread of the worker, and none of the other processes; this shows
what each thread and process spent over the same span, so the figures can be reconciled.
"""

from __future__ import annotations

import os
from collections import defaultdict

import psutil

_TICK = os.sysconf("SC_CLK_TCK")


def _role(pid: int, title: str) -> str:
    """`driver`; a Ray actor or agent by its class (`StatsActor`, ...); `task worker` for
    every other `ray::` title (it names the task it runs, `ray::IDLE` between tasks); else
    the program's name (`raylet`, `gcs_server`; a Python script by its file)."""
    if pid == os.getpid():
        return "driver"
    if title.startswith("ray::"):
        name = title[5:].split()[0].split(".")[0] if title[5:].strip() else "IDLE"
        long_lived = any(w in name for w in ("Actor", "Agent", "Coordinator"))
        return name.lstrip("_") if long_lived else "task worker"
    words = [os.path.basename(w) for w in title.split()]
    if words[0].startswith("python"):  # a script by its file
        return next((w for w in words[1:] if w.endswith(".py")), words[0])
    return words[0]


def snapshot() -> dict[tuple[int, int], tuple[float, str, str]]:
    """(pid, tid) -> (CPU seconds so far, the process's role, the thread's name; `main` for
    a process's first thread) for this process and all its descendants; (pid, 0) -> the
    process's own total, which also holds the threads that have ended (decord's decoder
    threads live as long as a reader)."""
    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            title = " ".join(proc.cmdline()) or proc.name()
            role = _role(proc.pid, title)
            with open(f"/proc/{proc.pid}/stat") as f:
                out[(proc.pid, 0)] = (_cpu_s(f.read()), role, "")
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                with open(f"/proc/{proc.pid}/task/{tid}/stat") as f:
                    cpu = _cpu_s(f.read())
                with open(f"/proc/{proc.pid}/task/{tid}/comm") as f:
                    name = "main" if int(tid) == proc.pid else f.read().strip()
                out[(proc.pid, int(tid))] = (cpu, role, name)
        except (psutil.Error, OSError):  # a process or thread that ended meanwhile
            continue
    return out


def _cpu_s(stat: str) -> float:
    """utime + stime of a /proc stat line (its 14th and 15th fields), in seconds."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def spent(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """CPU seconds between two snapshots, role -> thread name -> seconds (threads of one name
    summed over the role's processes; `(ended threads)`: a process's total less its live
    threads'). A worker keeps the role it had in `before`: its title changes between tasks."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (pid, tid), (cpu, role, name) in after.items():
        cpu0, role0, _ = before.get((pid, tid), (0.0, role, name))
        d = cpu - cpu0
        if tid == 0:  # the process's total: what its live threads do not hold
            live = sum(c - before.get((p, t), (0.0,))[0] for (p, t), (c, _, _) in after.items()
                       if p == pid and t)  # fmt: skip
            name, d = "(ended threads)", d - live
        if d > 0:
            out[role0][name] += d
    return {r: {n: round(s, 3) for n, s in sorted(t.items(), key=lambda x: -x[1])}
            for r, t in out.items()}  # fmt: skip
