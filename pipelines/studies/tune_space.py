"""The `tune:` section of a study YAML: a typed `TuneConfig` and its search space.

    space:                                        # dotted config key -> one domain
      model.quantizer.codebook_size: {choice: [16, 64]}
      optim.lr: {loguniform: [1e-4, 3e-3]}
      loss.quantizer_weight: {uniform: [0.5, 2]}

Domains (YAML data, never evaluated): `choice: [v, ...]`, `grid: [v, ...]` (every value,
each `num_samples` times), `uniform: [lo, hi]`, `quniform: [lo, hi, q]`, `loguniform: [lo,
hi]` (lo > 0), `randint: [lo, hi]` (both ends included). A space is a product: there are no
conditional keys, so every combination must be a valid config (searching
`model.quantizer.type` together with a field only one type has is an error at once).

`check_space` fails before any trial starts, naming the key: an unknown domain, a key outside
the config tree, or a value that makes an invalid config (each key's choices and bounds are
tried alone, then with the others at their first value, through the checks of `vqtok train`,
which build the model's quantizers).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

from pipelines.config import Config, ConfigError, from_dict, set_dotted, validate

DOMAINS = ("choice", "grid", "uniform", "quniform", "loguniform", "randint")
SEARCHES = ("random", "optuna")


@dataclass
class SchedulerConfig:
    """`asha` (ASHA, arXiv:1810.05934) stops the worse trials at rungs grace_period·rf^k
    (optimiser steps, up to train.steps); `fifo` runs every trial to the end."""

    type: str = "asha"  # "asha" | "fifo"
    grace_period: int = 1  # steps before a trial can be stopped: the first rung
    reduction_factor: float = 2.0  # keep the best 1/rf of the trials at each rung


@dataclass
class TuneConfig:
    """The `tune:` section: what to optimise, how many trials and how many at once, the
    scheduler and search algorithm, and the space."""

    metric: str = "eval/psnr"  # a metric the loop reports: eval/* (at eval_every), train/*
    mode: str = "max"  # "max" | "min"
    num_samples: int = 4  # trials (times the size of any grid)
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs fit
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search: str = "random"  # "random" | "optuna" (TPE; needs `pip install optuna`)
    seed: int | None = 0  # of the search algorithm; None: not reproducible
    space: dict = field(default_factory=dict)  # dotted config key -> {domain: args}
    register_as: str | None = None  # register the best trial's model under this name

    def validate(self, train: Config) -> None:
        def check(ok: bool, key: str, value: Any, expected: str) -> None:
            if not ok:
                raise ConfigError(f"tune.{key}: got {value!r}, expected {expected}")

        check(self.metric.startswith(("eval/", "train/")), "metric", self.metric,
              "a metric the training loop reports, e.g. eval/psnr or train/recon_l1")  # fmt: skip
        check(self.mode in ("max", "min"), "mode", self.mode, "'max' or 'min'")
        check(self.num_samples >= 1, "num_samples", self.num_samples, ">= 1")
        check(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
              "max_concurrent_trials", self.max_concurrent_trials, "null or >= 1")  # fmt: skip
        check(self.search in SEARCHES, "search", self.search, f"one of {SEARCHES}")
        s = self.scheduler
        check(s.type in ("asha", "fifo"), "scheduler.type", s.type, "'asha' or 'fifo'")
        check(s.grace_period >= 1, "scheduler.grace_period", s.grace_period, ">= 1")
        check(s.reduction_factor > 1, "scheduler.reduction_factor", s.reduction_factor, "> 1")
        if s.type == "asha":
            check(s.grace_period <= train.train.steps, "scheduler.grace_period",
                  s.grace_period, f"<= train.steps ({train.train.steps})")  # fmt: skip
            if self.metric.startswith("eval/") and not train.train.eval_every:
                raise ConfigError(
                    "train.eval_every: ASHA on an eval/* metric needs intermediate evals "
                    "(set train.eval_every > 0, at most tune.scheduler.grace_period)"
                )
        check(bool(self.space), "space", self.space, "a mapping of dotted keys to domains")
        if self.search == "optuna":
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "tune.search: 'optuna' needs the optuna package "
                    "(pip install optuna, or pip install 'vqtok[tune]')"
                ) from None
            grids = [k for k, v in self.space.items() if isinstance(v, dict) and "grid" in v]
            check(not grids, "search", self.search, f"'random' with grid domains ({grids})")


def parse_domain(key: str, spec: Any) -> tuple[Any, list]:
    """`{kind: args}` -> (the Ray Tune domain, values to probe the config with)."""
    from ray import tune

    where = f"tune.space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one {{domain: args}} mapping, e.g. "
                          f"{{choice: [16, 64]}}; got {spec!r}")  # fmt: skip
    kind, args = next(iter(spec.items()))
    if kind not in DOMAINS:
        raise ConfigError(f"{where}: unknown domain {kind!r}; known: {', '.join(DOMAINS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} takes a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        domain = tune.choice(args) if kind == "choice" else tune.grid_search(args)
        return domain, list(args)
    n = 3 if kind == "quniform" else 2
    if len(args) != n:
        raise ConfigError(f"{where}: {kind} takes {n} numbers, got {args!r}")
    if kind == "randint":
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: randint takes two integers, got {args!r}")
        lo, hi = args
        _bounds(where, kind, lo <= hi, args, "lo <= hi")
        return tune.randint(lo, hi + 1), [lo, hi]  # Ray's upper end is exclusive
    nums = [_number(where, kind, a) for a in args]
    lo, hi = nums[:2]
    _bounds(where, kind, lo < hi, args, "lo < hi")
    if kind == "uniform":
        return tune.uniform(lo, hi), [lo, hi]
    if kind == "loguniform":
        _bounds(where, kind, lo > 0, args, "lo > 0")
        return tune.loguniform(lo, hi), [lo, hi]
    _bounds(where, kind, nums[2] > 0, args, "q > 0")
    return tune.quniform(lo, hi, nums[2]), [lo, hi]


def build_space(space: dict) -> dict[str, Any]:
    """The Tune `param_space`: {dotted key: domain} (flat; a trial's config is flat too)."""
    return {key: parse_domain(key, spec)[0] for key, spec in space.items()}


def check_space(tc: TuneConfig, base: dict) -> None:
    """Fail at once, naming the key, for any space that cannot make a valid config."""
    probes = {}
    for key, spec in tc.space.items():
        check_key(key)
        probes[key] = parse_domain(key, spec)[1]
    for key, values in probes.items():  # each value alone: the error names its key
        for value in values:
            try:
                resolve(base, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key}: {value!r} makes an invalid config: "
                                  f"{exc}") from None  # fmt: skip
    first = {k: v[0] for k, v in probes.items()}
    for key, values in probes.items():  # then with the others (at their first value)
        for value in values:
            combo = {**first, key: value}
            try:
                resolve(base, combo)
            except ConfigError as exc:
                raise ConfigError(
                    f"tune.space: the combination {combo} makes an invalid config: {exc} (a "
                    "space is a product: every combination of its values must be valid)"
                ) from None


def check_key(key: str) -> None:
    """A dotted key must name a field of the config tree (fields of the spec-typed sections,
    model and disc, are checked by `check_space`'s probes)."""
    where = f"tune.space.{key}"
    if key.split(".")[0] == "run":
        raise ConfigError(f"{where}: run.* is set per trial by vqtok tune; not searchable")
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in fields(cls)}
        if part not in names:
            raise ConfigError(f"{where}: {part!r} is not a key of "
                              f"{'.'.join(parts[:i]) or 'the config'}; valid: {sorted(names)}")  # fmt: skip
        field_ = next(f for f in fields(cls) if f.name == part)
        if "spec" in field_.metadata:  # model, disc: typed by vqcore from the whole spec
            return
        tp = get_type_hints(cls)[part]
        if tp is dict:
            return
        if is_dataclass(tp):
            if i == len(parts) - 1:
                raise ConfigError(f"{where}: names a whole section; search its fields")
            cls = tp
        elif i < len(parts) - 1:
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is a value, not a section")


def resolve(base: dict, values: dict[str, Any]) -> Config:
    """The training config of one trial: `base` (raw YAML data) with dotted `values`,
    checked as `load_config` checks (the model's quantizers included)."""
    raw = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(raw, key, value)
    cfg = from_dict(Config, raw, "")
    validate(cfg)
    return cfg


def space_json(space: dict) -> str:
    return json.dumps(space, sort_keys=True)


def _number(where: str, kind: str, value: Any) -> float:
    try:  # YAML 1.1 reads 1e-4 (no dot) as a string
        out = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out):
        raise ConfigError(f"{where}: {kind} takes numbers, got {value!r}")
    return out


def _bounds(where: str, kind: str, ok: bool, args: list, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {kind} needs {rule}, got {args!r}")
