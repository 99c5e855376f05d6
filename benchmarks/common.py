"""Helpers shared by the benchmarks: timing, peak memory, one JSON line per case."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], device: torch.device, warmup: int = 3, iters: int = 10
) -> dict[str, float]:
    """Median and p90 wall ms of fn() and peak memory (CUDA: allocator peak during the timed
    calls above what was allocated before them, and the absolute allocated and reserved
    peaks; CPU: the process's max RSS so far, which only grows: read it as an upper bound)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    totals = {}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
        mem_kind = "cuda_peak_allocated_minus_inputs"
        # what a GPU must hold: weights, optimizer state and inputs included
        totals = {
            "peak_allocated_total_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_total_bytes": torch.cuda.max_memory_reserved(device),
        }
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mem_kind = "process_max_rss"
    times.sort()
    return {
        "ms_median": statistics.median(times),
        "ms_p90": times[min(len(times) - 1, int(0.9 * len(times)))],
        "peak_mem_bytes": int(peak),
        "peak_mem_kind": mem_kind,
        **totals,
    }


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)
