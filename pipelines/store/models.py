"""A trained tokenizer as a self-contained MLflow model, and loading one from anywhere.

    export_model(model, model_cfg, out, identity)   # rank 0, at the end of training
    loaded = load_model("runs:/<id>/model")         # or models:/<name>/<version>, a run
                                                    # folder, a checkpoint, a model folder
    loaded.model, loaded.config, loaded.identity    # EMA weights in eval mode

The exported folder is an MLflow pyfunc model (`MLmodel`, `artifacts/model.pt` = the state
dict, `artifacts/model.yaml` = the model config). The pyfunc is "models from code"
(`pipelines/store/pyfunc.py`), so neither saving nor loading pickles anything; vqtok itself
never goes through pyfunc: it rebuilds the model with `vqcore.models.build_model(model.yaml)`
and loads `model.pt` with `weights_only=True`. `mlflow.pyfunc.load_model(uri).predict(video)`
gives the codes to users outside vqtok.

A model's identity is what token shards record: the MLflow run id (when known), a hash of
its model config and a hash of its weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

WEIGHTS, CONFIG, IDENTITY, DATA = "model.pt", "model.yaml", "identity.json", "data.yaml"
ENTRY = Path(__file__).with_name("pyfunc.py")


class ModelLoadError(RuntimeError):
    """A model spec that names nothing loadable; the message says what was looked for."""


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on the CPU
    config: dict[str, Any]  # the model section of the run config
    identity: dict[str, Any] = field(default_factory=dict)  # source, run_id, hashes
    data: dict[str, Any] | None = None  # the training run's data section, when known

    @property
    def video(self) -> bool:
        return self.model.config.takes_clips


def config_hash(model_cfg: dict) -> str:
    return hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:16]


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        flat = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def export_model(
    model: nn.Module,
    model_cfg: dict,
    out: Path,
    identity: dict | None = None,
    data_cfg: dict | None = None,
) -> Path:
    """Write `out/` as an MLflow pyfunc model folder (replacing an older export); the
    training data section goes beside it as the default decode settings of tokenize/eval."""
    import os

    import mlflow.pyfunc

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one per file
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ident = {**(identity or {}), "config_hash": config_hash(model_cfg),
             "weights_hash": weights_hash(state)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vqtok-model-") as tmp:
        tmp = Path(tmp)
        torch.save(state, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(yaml.safe_dump(model_cfg, sort_keys=False))
        (tmp / IDENTITY).write_text(json.dumps(ident, indent=1))
        (tmp / DATA).write_text(yaml.safe_dump(data_cfg or {}, sort_keys=False))
        staged = tmp / "mlflow_model"
        mlflow.pyfunc.save_model(
            path=str(staged),
            python_model=str(ENTRY),
            artifacts={n: str(tmp / n) for n in (WEIGHTS, CONFIG, IDENTITY, DATA)},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pyyaml"],
            metadata={"vqtok": ident},
        )
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), out)
    return out


def build_from_files(weights: Path, config: Path, key_prefix: str = "") -> nn.Module:
    """`build_model(config)` + the state dict in `weights` (`weights_only=True`); a file that
    is missing, truncated or does not fit the config is a `ModelLoadError` naming it."""
    from vqcore.models import build_model

    try:
        cfg = yaml.safe_load(config.read_text())
        model = build_model(cfg["model"] if "model" in cfg and "type" not in cfg else cfg)
    except Exception as exc:
        raise ModelLoadError(f"cannot build the model of {config}: {exc}") from exc
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated files
        raise ModelLoadError(f"corrupted or unreadable weights {weights}: {exc}") from exc
    state = {k.removeprefix(key_prefix): v for k, v in state.items() if k != "n_averaged"}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"{weights} does not fit the model in {config}: {exc}") from exc
    return model.eval()


def _from_model_dir(path: Path, identity: dict) -> LoadedModel:
    arts = path / "artifacts"
    model = build_from_files(arts / WEIGHTS, arts / CONFIG)
    if (arts / IDENTITY).is_file():
        identity = {**json.loads((arts / IDENTITY).read_text()), **identity}
    cfg = yaml.safe_load((arts / CONFIG).read_text())
    data = yaml.safe_load((arts / DATA).read_text()) if (arts / DATA).is_file() else None
    return LoadedModel(model, cfg, identity, data)


def _from_checkpoint(path: Path, identity: dict) -> LoadedModel:
    from pipelines.store import checkpoint as ckpt
    try:
        ckpt.check_loadable(path)
    except ckpt.CheckpointError as exc:
        raise ModelLoadError(str(exc)) from exc
    model = build_from_files(path / "ema.pt", path / "config.yaml", key_prefix="module.")
    run_cfg = yaml.safe_load((path / "config.yaml").read_text())
    cfg, state = run_cfg["model"], model.state_dict()
    ident = {"config_hash": config_hash(cfg), "weights_hash": weights_hash(state), **identity}
    return LoadedModel(model, cfg, ident, run_cfg.get("data"))


def load_model(spec: str | Path) -> LoadedModel:
    """A model from an MLflow URI (`runs:/…`, `models:/…`, any artifact URI of an exported
    model), a run folder (its exported `model/`, else its newest checkpoint), a checkpoint
    folder (`step_N`, EMA weights) or an exported model folder."""
    text = str(spec)
    if "://" in text or text.startswith(("runs:/", "models:/")):
        import os

        import mlflow.artifacts

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        tmp = Path(tempfile.mkdtemp(prefix="vqtok-model-"))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(tmp)))
        except Exception as exc:
            raise ModelLoadError(f"cannot download the model {text}: {exc}") from exc
        ident = {"source": text}
        if text.startswith("runs:/"):
            ident["run_id"] = text.removeprefix("runs:/").split("/", 1)[0]
        return _from_model_dir(local, ident)
    path = Path(text).expanduser()
    if (path / "MLmodel").is_file():
        return _from_model_dir(path, {"source": str(path.resolve())})
    if (path / "train_state.json").is_file():
        return _from_checkpoint(path, {"source": str(path.resolve()), **_run_id(path.parent)})
    if (path / "model" / "MLmodel").is_file():
        return _from_model_dir(path / "model", {"source": str(path.resolve()), **_run_id(path)})
    from pipelines.store import checkpoint as ckpt
    if path.is_dir() and (found := ckpt.latest(path)) is not None:
        return _from_checkpoint(found, {"source": str(found.resolve()), **_run_id(path)})
    raise ModelLoadError(
        f"{text}: not an MLflow model URI, an exported model folder (MLmodel), a checkpoint "
        "folder (train_state.json) or a run folder with either"
    )


def _run_id(run_dir: Path) -> dict:
    f = run_dir / "mlflow_run_id"
    return {"run_id": f.read_text().strip()} if f.is_file() else {}


def flatten_codes(codes, prefix: str = "l") -> dict[str, torch.Tensor]:
    """Nested code tuples -> {"l0": …, "l1.0": …}; names encode the nesting."""
    if isinstance(codes, torch.Tensor):
        return {prefix: codes}
    out: dict[str, torch.Tensor] = {}
    for i, c in enumerate(codes):
        out.update(flatten_codes(c, f"{prefix}{i}" if prefix == "l" else f"{prefix}.{i}"))
    return out


def unflatten_codes(flat: dict[str, Any]):
    """Inverse of `flatten_codes`."""
    if list(flat) == ["l"]:
        return flat["l"]

    def build(prefix: str):
        if prefix in flat:
            return flat[prefix]
        kids = sorted({int(k[len(prefix) :].lstrip(".").split(".")[0])
                       for k in flat if k.startswith(prefix) and k != prefix})  # fmt: skip
        sep = "" if prefix == "l" else "."
        return tuple(build(f"{prefix}{sep}{i}") for i in kids)

    return build("l")
