"""Console progress of long work that is not a training loop (`vqtok tokenize`, `eval`,
`detokenize`, `ablate`): one plain line at most every `every_s` seconds and one at the end,
on stderr. Lines rather than a redrawn bar (tqdm, as `vqtok shards` uses on a terminal),
because these verbs mostly run under `ray job submit`, whose logs keep every redraw. And
vqtok's own warnings in one line (`one_line_warnings`)."""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import TextIO


def one_line_warnings() -> None:
    """Print vqtok's own warnings (raised in vqcore or pipelines, e.g. "LPIPS is OFF") as one
    `[vqtok] warning: ...` line instead of Python's file:line header and source line; other
    libraries' warnings keep Python's format. The CLI and every training worker install it
    unless `--verbose`."""
    warnings.formatwarning = _format_warning


def _format_warning(message, category, filename, lineno, line=None,
                    _python=warnings.formatwarning):  # fmt: skip
    if f"{os.sep}vqcore{os.sep}" in filename or f"{os.sep}pipelines{os.sep}" in filename:
        return f"[vqtok] warning: {message}\n"
    return _python(message, category, filename, lineno, line)


class Progress:
    """`Progress("tokenize", total=12, unit="shards")`; `update(done=1, samples=16)` as work
    finishes; `close()` prints the final line (once)."""

    def __init__(self, verb: str, total: int | None = None, unit: str = "shards",
                 every_s: float = 5.0, stream: TextIO | None = None):  # fmt: skip
        self.verb, self.total, self.unit, self.every_s = verb, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = self.samples = 0
        self.t0 = self.last = time.perf_counter()
        self.closed, self.printed = False, None  # the (done, samples) of the last line

    def update(self, done: int = 0, samples: int = 0) -> None:
        self.done += done
        self.samples += samples
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(now)

    def close(self) -> None:
        """The final line, unless the last line already said it all."""
        if not self.closed:
            self.closed = True
            if self.printed != (self.done, self.samples):
                self._print(time.perf_counter())

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.t0, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        text = f"[vqtok] {self.verb}: {self.done}{of} {self.unit}"
        if self.samples:
            text += f", {self.samples} samples, {self.samples / elapsed:.1f} samples/s"
        if self.total and 0 < self.done < self.total:
            text += f", ETA {elapsed / self.done * (self.total - self.done):.0f}s"
        return text + f" ({elapsed:.0f}s)"

    def _print(self, now: float) -> None:
        self.printed = (self.done, self.samples)
        print(self.line(now), file=self.stream, flush=True)
