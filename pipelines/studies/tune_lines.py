"""What `vqtok tune` prints while it runs: one line per trial event, in place of Ray Tune's
periodic status tables (~250 columns wide; `--verbose` brings them back).

    [vqtok] trial 8c1f2_00001 started: optim.lr=0.0012, model.quantizer.codebook_size=64
    [vqtok] trial 8c1f2_00001 step 20: eval/psnr 14.21
    [vqtok] trial 8c1f2_00001 ended at step 20 of 60 (stopped by the scheduler): eval/psnr 14.21
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ray.tune import Callback


class TrialLines(Callback):
    """A Tune callback printing vqtok's line per trial start, evaluation, end and error."""

    def __init__(self, metric: str, keys: list[str], steps: int, stream=None):
        self.metric, self.keys, self.steps = metric, list(keys), steps
        self.stream = stream  # None: sys.stdout when printing (the Tuner pickles callbacks)
        self.last: dict[str, tuple[int, Any]] = {}  # trial id -> (step, metric value)

    def _say(self, text: str) -> None:
        print(f"[vqtok] {text}", file=self.stream or sys.stdout, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        values = ", ".join(f"{k}={_short(trial.config.get(k))}" for k in self.keys)
        self._say(f"trial {trial.trial_id} started: {values}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        step = int(result.get("step", 0))
        if self.metric in result:  # an evaluation: the metric the search ranks by
            self.last[trial.trial_id] = (step, result[self.metric])
            self._say(f"trial {trial.trial_id} step {step}: {self.metric} "
                      f"{_short(result[self.metric])}")  # fmt: skip

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        step, value = self.last.get(trial.trial_id, (0, None))
        how = "" if step >= self.steps else " (stopped by the scheduler)"
        self._say(f"trial {trial.trial_id} ended at step {step} of {self.steps}{how}: "
                  f"{self.metric} {_short(value)}")  # fmt: skip

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._say(f"trial {trial.trial_id} failed (retried up to scaling.max_failures; "
                  f"its error is in the final table)")  # fmt: skip


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)
