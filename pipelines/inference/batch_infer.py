"""Batch inference over shards with Ray Data: decode tasks -> a pool of model actors.

    for row in infer(loaded, shards, data_cfg, task="tokenize", actors=2):  # on the driver
        row["shard"], row["keys"], unpack(row["payload"]), row["done"], ...

    shard paths (one row each) -> `decode_shard` (Ray tasks: the training decode stage with
    `DataConfig.center`: one resolution and frame count, centred crop, first frames; tar
    members in order) -> `InferenceActor` (`map_batches` with `ActorPoolStrategy`: EMA
    weights, no gradients, bf16 autocast on GPU) -> small rows back to the driver.

`task="tokenize"`: the payload is the codes of every quantizer level (`model_store.
flatten_codes` names), batch-first int32. `task="eval"`: the payload is a mergeable
`ReconMetrics` state plus each top-level quantizer's code histogram of the batch, so the
driver's sums are exact (means over frames, usage and perplexity from summed histograms).
Each shard ends with a `done` row carrying its count of decoded samples, so the consumer
knows when a shard is complete without ordering rows. `plain_rows` is the same stages in
one process (no Ray): tests and single-machine runs compare the two.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch

from pipelines.data.batches import DataConfig, decode_group, from_row, to_row
from pipelines.data.tars import iter_tar_samples

TASKS = ("tokenize", "eval")


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(data: bytes) -> dict[str, np.ndarray]:
    if not data:
        return {}
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------- decode stage


def _row(shard: str, b: dict | None, meta: dict, done: int = -1,
         skipped: Counter | None = None) -> dict:  # fmt: skip
    """One output row: the batch's Ray row (`pipelines.data.batches.to_row`) with its
    shard, each sample's metadata, and `done` >= 0 on a shard's last row (its number of
    decoded samples)."""
    keys = b["keys"] if b else []
    return {**to_row(b, skipped), "shard": np.array([shard], object),
            "meta": np.array([json.dumps([meta.get(k) for k in keys])], object),
            "done": np.array([done], np.int64)}  # fmt: skip


def _meta(row: dict) -> dict | None:
    raw = row.get("json")
    try:
        return json.loads(bytes(raw)) if isinstance(raw, (bytes, bytearray, memoryview)) else None
    except ValueError:
        return None


def decode_shard(shard: str, cfg: DataConfig) -> Iterator[dict]:
    """A whole shard, in member order -> decoded batches (rows as in `_row`), then a `done`
    row; a tar that breaks midway counts `bad_shard` and ends the shard there."""
    count, skipped, group, meta = 0, Counter(), [], {}

    def flush(rows):
        nonlocal count
        for b in decode_group(rows, cfg, epoch=0):
            count += len(b["keys"])
            yield _row(shard, b, meta)

    try:
        for sample in iter_tar_samples(shard, cfg.max_member_bytes):
            meta[str(sample.get("__key__", ""))] = _meta(sample)
            group.append(sample)
            if len(group) == cfg.batch_size:
                yield from flush(group)
                group, meta = [], {}
    except Exception:  # noqa: BLE001 - a shard cut short: keep what was read, count it
        skipped["bad_shard"] += 1
    if group:
        yield from flush(group)
    yield _row(shard, None, {}, done=count, skipped=skipped)


def _ray_decode_shard(batch: dict, cfg: DataConfig) -> Iterator[dict]:
    for shard in batch["shard"]:
        yield from decode_shard(str(shard), cfg)


# ---------------------------------------------------------------- model stage


class InferenceActor:
    """Holds one model; `__call__` maps one decoded-batch row to a payload row. Ray builds
    it from a model config and state dict (`fn_constructor_kwargs`); `plain_rows` hands it
    a model already loaded (`model=`)."""

    def __init__(self, model_cfg: dict, state=None, task: str = "tokenize",
                 use_gpu: bool = False, model=None):  # fmt: skip
        from vqcore.models import build_model

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if model is None:
            model = build_model(model_cfg)
            model.load_state_dict(state)
        self.model = model.to(self.device).eval()
        self.video, self.task = self.model.config.takes_clips, task

    def __call__(self, batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k != "video"}
        payload = []
        for i in range(len(batch["keys"])):
            video = np.asarray(batch["video"][i])
            nums = torch.as_tensor(np.asarray(batch["num_frames"][i], np.int32))
            if video.shape[0] == 0:
                payload.append(b"")
                continue
            x = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 4, 1, 2, 3)
            fn = tokenize_batch if self.task == "tokenize" else eval_batch
            payload.append(pack(fn(self.model, x, nums, self.device, self.video)))
        out["payload"] = np.array(payload, object)
        return out


@torch.no_grad()
def tokenize_batch(model, video_u8, num_frames, device, video: bool) -> dict[str, np.ndarray]:
    """uint8 (B, 3, T, H, W) -> {level: int32 codes (B, …)}; image models code every frame,
    so their codes are (B, T, …)."""
    from pipelines.data.inputs import autocast, fold_frames, to_model_input
    from pipelines.store.models import flatten_codes

    x = to_model_input(video_u8, device)
    b, t = x.shape[0], x.shape[2]
    with autocast(device, bf16=device.type == "cuda"):
        codes = model.tokenize(x if video else fold_frames(x))
    out = {}
    for name, c in flatten_codes(codes).items():
        c = c if video else c.reshape(b, t, *c.shape[1:])
        if c.numel() and int(c.max()) >= 2**31:
            raise ValueError(f"codes of level {name} do not fit int32")
        out[name] = c.to(torch.int32).cpu().numpy()
    return out


@torch.no_grad()
def eval_batch(model, video_u8, num_frames, device, video: bool) -> dict[str, np.ndarray]:
    """One batch's mergeable metric state and per-quantizer code histograms (`hist{i}`)."""
    from pipelines.inference.evaluate import EvalAccumulator

    acc = EvalAccumulator(model, device, video=video)
    acc.update({"video": video_u8, "num_frames": num_frames})
    return acc.state()


# ---------------------------------------------------------------- the pipelines


def inference_data(loaded, shards: list[str], overrides: list[str]) -> DataConfig:
    """The decode settings of tokenize/eval: the model's training data section (when known)
    <- `data.key=value` overrides, then one resolution and one frame count (the first of
    each), centred crops, first frames, shards in the order given."""
    from pipelines.config import ConfigError, from_dict, parse_override

    data = {k: v for k, v in (loaded.data or {}).items() if k in DataConfig.__dataclass_fields__}
    data["shards"] = list(shards)
    for item in overrides:
        key, value = parse_override(item)
        if not key.startswith("data."):
            raise ConfigError(f"only data.key=value overrides are taken, got {item!r}")
        data[key.removeprefix("data.")] = value
    cfg = from_dict(DataConfig, data, "data")
    cfg.resolutions, cfg.frame_counts = cfg.resolutions[:1], cfg.frame_counts[:1]
    cfg.center, cfg.shuffle_files = True, False
    return cfg


def infer(loaded, shards: list[str], cfg: DataConfig, task: str, actors: int = 2,
          use_gpu: bool = False, cpus_per_actor: float = 0.5) -> Iterator[dict]:  # fmt: skip
    """Rows of payloads from a Ray Data pipeline (see module doc); Ray must be initialised."""
    import ray.data

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(
        _ray_decode_shard, batch_size=1, batch_format="numpy", num_cpus=cfg.num_cpus,
        fn_kwargs={"cfg": cfg},
    )  # fmt: skip
    ds = ds.map_batches(
        InferenceActor,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={
            "model_cfg": loaded.config,
            "state": state,
            "task": task,
            "use_gpu": use_gpu,
        },  # fmt: skip
        num_cpus=0 if use_gpu else cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(block["keys"])):
            yield _plain_row({k: v[i] for k, v in block.items()})


def plain_rows(loaded, shards: list[str], cfg: DataConfig, task: str) -> Iterator[dict]:
    """The same rows in this process, no Ray."""
    actor = InferenceActor(loaded.config, task=task, model=loaded.model)
    for shard in shards:
        for row in decode_shard(shard, cfg):
            out = actor(row)
            yield _plain_row({k: v[0] for k, v in out.items()})


def _plain_row(r: dict) -> dict:
    b = from_row(r)
    return {"shard": str(r["shard"]), "keys": b["keys"], "num_frames": b["num_frames"].tolist(),
            "meta": json.loads(str(r["meta"])), "done": int(r["done"]),
            "skipped": dict(b["skipped"]), "payload": r["payload"]}  # fmt: skip
