"""Run configuration: dataclass defaults ← YAML file ← `key=value` overrides, checked once.

    cfg = load_config("jobs/demo.yaml", ["optim.lr=3e-4", "model.quantizer.type=vq"])

Unknown keys and bad values fail at once with a message naming the dotted key. `model` and
`disc` are typed by the library that builds them (vqcore): the YAML's `{type, flavour,
**fields}` becomes the model's `TokenizerConfig` and the discriminator's config, and every
quantizer is built once, so a wrong field is caught here, before any worker starts. The
resolved config (every model field written out) goes into the run folder and to MLflow.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.data.batches import DataConfig
from vqcore.losses import TokenizerLossConfig
from vqcore.models import TokenizerConfig, model_config
from vqcore.models.discriminator import DiscriminatorConfig, discriminator_config


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


@dataclass
class OptimConfig:
    """Adam(W) + linear warmup then linear decay to 0 (PVQ-VAE seed, sec. 1.3)."""

    name: str = "adamw"  # "adam" | "adamw"
    lr: float = 1e-4
    disc_lr: float | None = None  # discriminator lr; None = lr
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per optimiser step (DeepSpeed accumulation)
    fused: bool = True  # torch's fused Adam(W): one kernel for all parameters (false: foreach)

    def validate(self) -> None:
        _check(self.name in ("adam", "adamw"), "optim.name", self.name, "'adam' or 'adamw'")
        _check(self.lr > 0, "optim.lr", self.lr, "a positive learning rate")
        _check(self.disc_lr is None or self.disc_lr > 0, "optim.disc_lr", self.disc_lr, "> 0")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "two in [0, 1)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, ">= 0 (0 = off)")
        _check(self.grad_accum >= 1, "optim.grad_accum", self.grad_accum, ">= 1")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimiser steps
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16"
    zero_stage: int = 2
    activation_checkpointing: bool = False
    # torch.compile of the generator and discriminator (nn.Module.compile: in place, the
    # state-dict names and checkpoints unchanged); the backend "eager" traces without
    # generating code (a quick check of the graphs, used by the tests)
    compile: bool = False
    compile_backend: str = "inductor"
    ema_decay: float = 0.999  # EMA of generator weights, used for eval and export
    seed: int = 42
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 3  # checkpoints kept
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 4
    eval_shards: tuple[str, ...] = ()  # validation shards; empty = the training shards
    # non-finite losses in a row (each skipped) that stop the run, with a checkpoint of the
    # weights from before the first; 0 = never stop
    max_nonfinite_steps: int = 20

    def validate(self) -> None:
        _check(self.steps >= 1, "train.steps", self.steps, ">= 1")
        _check(
            self.max_nonfinite_steps >= 0,
            "train.max_nonfinite_steps",
            self.max_nonfinite_steps,
            ">= 0 (0 = never stop)",
        )
        _check(
            self.precision in ("auto", "fp32", "bf16"),
            "train.precision",
            self.precision,
            "'auto', 'fp32' or 'bf16' (fp16 is not supported on CPU)",
        )
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", self.zero_stage, "0-3")
        _check(
            not (self.compile and self.zero_stage == 3),
            "train.compile",
            self.compile,
            "false with train.zero_stage 3 (ZeRO-3 gathers parameters in module hooks, which "
            "a compiled module does not run as DeepSpeed expects)",
        )
        _check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in [0, 1)")
        for key in ("log_every", "ckpt_every", "keep_last", "eval_batches"):
            _check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), ">= 1")


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # < 1 on small machines, or Ray Data starves (docs/RUNTIME.md)
    max_failures: int = 2  # worker-group restarts from the latest checkpoint; -1 = no limit

    def validate(self) -> None:
        _check(self.num_workers >= 1, "scaling.num_workers", self.num_workers, ">= 1")
        _check(self.max_failures >= -1, "scaling.max_failures", self.max_failures, ">= -1")
        _check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", self.cpus_per_worker, "> 0")


@dataclass
class RunConfig:
    name: str = "vqtok"
    storage: str = "runs"  # run folders live at <storage>/<name>; shared storage on a cluster
    resume: str = (
        "auto"  # "auto": continue <name> if it has a checkpoint; "never": fail if it exists
    )
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else a SQLite store in the run
    experiment: str = "vqtok"
    parent_run_id: str | None = None  # MLflow parent (a tune study's run); set by vqtok tune
    system_metrics: bool = False  # CPU/GPU/memory/network of rank 0's node in the MLflow run

    def validate(self) -> None:
        _check(self.resume in ("auto", "never"), "run.resume", self.resume, "'auto' or 'never'")
        _check(
            bool(self.name) and "/" not in self.name,
            "run.name",
            self.name,
            "a non-empty name without '/'",
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.storage).expanduser().resolve() / self.name


DEFAULT_MODEL = {"type": "pvqvae", "flavour": "debug"}


@dataclass
class Config:
    # `model` and `disc` are read as specs (`{type, flavour, **fields}`; a spec without a
    # type refines the `spec` default) and typed by vqcore in __post_init__
    model: TokenizerConfig = field(default_factory=lambda: model_config(DEFAULT_MODEL),
                                   metadata={"spec": DEFAULT_MODEL})  # fmt: skip
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    # None: the seed's 3D discriminator for a video tokenizer, PatchGAN for an image one
    disc: DiscriminatorConfig | None = field(default=None, metadata={"spec": {}})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        self.model = _typed("model", model_config, self.model)
        video = self.model.takes_clips
        self.disc = _typed("disc", lambda s: discriminator_config(s, video), self.disc or {})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(model=self.model.to_spec(), disc=self.disc.to_spec())
        return _plain(out)


# one line per section of `Config`, for `vqtok train --help` (a test keeps it complete)
SECTIONS = {
    "model": "type + flavour + any field of the model's config (vqcore.models), quantizer spec",
    "loss": "recon, quantizer, LPIPS (local weights), GAN + adaptive weight, teacher",
    "disc": "discriminator type and fields (default: 3D for video, PatchGAN for images)",
    "data": "shards (files, globs, s3://), resolutions and frame counts sampled per step, "
            "batch size, decode workers",
    "optim": "Adam(W), lr, warm-up then linear decay, clipping, gradient accumulation",
    "train": "steps, precision, ZeRO stage, eval/ckpt/log cadence, EMA, eval shards",
    "scaling": "Ray Train workers, CPUs/GPUs each, restarts after a failure",
    "run": "name, storage folder, MLflow tracking URI and experiment, resume",
}


# --- loading ---------------------------------------------------------------------------------


def read_sections(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a config YAML (safe loader), or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's error in one line: the problem and where (1-based line and column)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem}{where}"


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` -> (key, the value read as YAML, safe loader); a ConfigError naming the
    override when it is not of that form or its value is not YAML (`optim.lr=[1,`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML "
                          f"({_yaml_problem(exc)}); quote it for the shell") from None  # fmt: skip


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults ← YAML at `path` ← `key=value` overrides; then validate every section."""
    raw: dict[str, Any] = read_sections(path) if path is not None else {}
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    cfg = from_dict(Config, raw, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for section in (cfg.optim, cfg.train, cfg.scaling, cfg.run, cfg.data, cfg.loss):
        if hasattr(section, "validate"):
            try:
                section.validate()
            except ConfigError:
                raise
            except ValueError as exc:  # a section's own check: prefix its name
                name = next(
                    f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is section
                )
                msg = str(exc)
                raise ConfigError(msg if msg.startswith(name) else f"{name}: {msg}") from exc
    _validate_model(cfg.model)


def save_config(cfg: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


# --- helpers ---------------------------------------------------------------------------------


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


def _typed(section: str, make: Any, spec: Any) -> Any:
    """vqcore's typed config of a spec section; its error as a ConfigError naming `section`."""
    try:
        return make(spec)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{section}: {exc}") from exc


def _validate_model(model: TokenizerConfig) -> None:
    """Every quantizer of the model built once (cheap: codebooks only), so a bad quantizer
    field fails here rather than in a worker."""
    from vqcore.quantizers import build

    for quantizer in model.quantizer_specs().values():
        _typed("model", build, quantizer)


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {p!r} is a value, not a section")
        d = nxt
    d[leaf] = value


def from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, recursing into dataclass-typed fields."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[_join(where, u) for u in unknown]}; valid: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        spec = fields[name].metadata.get("spec")
        if spec is not None:  # typed by the dataclass itself (Config.model, .disc)
            kwargs[name] = _merge_spec(spec, value) if isinstance(value, dict) else value
            continue
        kwargs[name] = _coerce(hints[name], value, _join(where, name))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:  # a dataclass's own __post_init__ check
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _merge_spec(default: dict, given: dict) -> dict:
    """A `{type: ...}` section given without a type (or the same type) refines the default;
    with another type it replaces it (the default's fields belong to the old type)."""
    if given.get("type", default.get("type")) != default.get("type"):
        return dict(given)
    out = dict(default)
    for k, v in given.items():
        out[k] = (
            _merge_spec(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        return origin(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp in (int, float, str, bool) and not (
        isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
