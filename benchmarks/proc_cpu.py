"""CPU seconds of every thread of this process and the processes it started (a local Ray:
GCS, raylet, workers, actors), from psutil (Linux; thread names from /proc).
`Dataset.stats()` counts a Ray task's CPU as `time.process_time()` of its worker from the start of a block to its yield (Ray 2.60
`BlockExecStats`): every thread of the worker, and none of the other processes; this shows
what each thread and process spent over the same span, so the figures can be reconciled.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import psutil


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
    threads live as long as a reader). Times from psutil; thread names from /proc."""
    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            role = _role(proc.pid, " ".join(proc.cmdline()) or proc.name())
            total = proc.cpu_times()
            out[(proc.pid, 0)] = (total.user + total.system, role, "")
            for t in proc.threads():
                with open(f"/proc/{proc.pid}/task/{t.id}/comm") as f:
                    name = "main" if t.id == proc.pid else f.read().strip()
                out[(proc.pid, t.id)] = (t.user_time + t.system_time, role, name)
        except (psutil.Error, OSError):  # a process or thread that ended meanwhile
            continue
    return out


def spent(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """CPU seconds between two snapshots, role -> thread name -> seconds (threads of one name
    summed over the role's processes; `(ended threads)`: a process's total less its live
    threads'). A worker keeps the role it had in `before`: its title changes between tasks."""
    out: dict[str, Counter] = defaultdict(Counter)
    live: Counter = Counter()  # pid -> its live threads' seconds
    for (pid, tid), (cpu, role, name) in sorted(after.items(), key=lambda kv: -kv[0][1]):
        cpu0, role0, _ = before.get((pid, tid), (0.0, role, name))
        d = cpu - cpu0
        if tid:
            live[pid] += d
        else:  # the totals sort after their threads (tid 0): what the live threads do not hold
            name, d = "(ended threads)", d - live[pid]
        if d > 0:
            out[role0][name] += d
    return {r: {n: round(s, 3) for n, s in t.most_common()} for r, t in out.items()}
