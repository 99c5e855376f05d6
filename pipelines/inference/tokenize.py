"""`vqtok tokenize` and `vqtok detokenize`: video/image shards <-> token shards.

    vqtok tokenize --model runs:/<id>/model --data shards/*.tar --out tokens/ [--actors 4]
    vqtok detokenize --tokens tokens/ --out recon/ [--max-samples 16]

Token shards are WebDataset tars, one per input shard (`<stem>-<crc of its path>.tar`):
    <key>.json      key, source shard and metadata, real frames, the model's identity (MLflow
                    run id, config and weights hashes), decode size, each level's shape/dtype
    <key>.l0.npy    int32 codes of each quantizer level (`model_store.flatten_codes` names:
    <key>.l1.npy    `l0`, `l1`, … for levels or scales, `l0.1` for nested tuples); video
                    models: the latent grid; image models: one grid per real frame (T, …)
Why WebDataset tar rather than Parquet: it is the format the training data already uses, so
the same readers (`webdataset`, Ray's `read_webdataset`) stream it into a generative model
per sample and shard, and `.npy` members keep every level's shape and dtype without a
schema; `np.load(allow_pickle=False)` reads them safely.

Each tar is written to `.partial` and renamed when the shard is complete, after its stats
(`<name>.stats.json`): a crash loses at most the shards being written, and a second run
with the same `--out` skips every input shard whose tar exists. `manifest.json` (rewritten
at the end) has the model identity, decode settings, per-shard and total counts, samples
skipped by reason, and this run's throughput.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pipelines.config import ConfigError
from pipelines.data.shards import download, upload
from pipelines.data.tars import list_shards
from pipelines.inference.batch_infer import infer, inference_data, plain_rows, unpack
from pipelines.store.models import LoadedModel, load_model, unflatten_codes
from pipelines.tracking.progress import Progress

MANIFEST = "manifest.json"


def token_shard_name(src: str) -> str:
    stem = Path(src).name.removesuffix(".tar")
    return f"{stem}-{zlib.crc32(str(Path(src).resolve()).encode()):08x}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class ShardWriter:
    """Collects one input shard's samples as rows arrive (any order); writes its token tar
    atomically once its `done` row and every decoded sample are in."""

    def __init__(self, out: Path, loaded: LoadedModel, decode: dict, remote: str | None = None):
        self.out, self.loaded, self.decode, self.remote = out, loaded, decode, remote
        self.pending: dict[str, dict] = {}
        self.written: list[dict] = []

    def add(self, row: dict) -> None:
        p = self.pending.setdefault(row["shard"], {"samples": [], "expected": None,
                                                   "skipped": Counter()})  # fmt: skip
        p["skipped"].update(row["skipped"])
        codes = unpack(row["payload"])
        for i, key in enumerate(row["keys"]):
            levels = {name: c[i] for name, c in codes.items()}
            if not self.loaded.video:  # image models: codes of the real frames only
                levels = {n: c[: row["num_frames"][i]] for n, c in levels.items()}
            p["samples"].append((key, row["meta"][i], row["num_frames"][i], levels))
        if row["done"] >= 0:
            p["expected"] = row["done"]
        if p["expected"] is not None and len(p["samples"]) == p["expected"]:
            self.written.append(self._write(row["shard"], self.pending.pop(row["shard"])))

    def _write(self, shard: str, p: dict) -> dict:
        name = token_shard_name(shard)
        tokens = sum(int(c.size) for *_, levels in p["samples"] for c in levels.values())
        stats = {"input": shard, "output": name, "samples": len(p["samples"]),
                 "skipped": dict(p["skipped"]), "tokens": tokens}  # fmt: skip
        _write_json(self.out / f"{name}.stats.json", stats)
        tmp = self.out / f"{name}.partial"
        with tarfile.open(tmp, "w") as tar:
            for key, meta, frames, levels in sorted(p["samples"], key=lambda s: s[0]):
                info = {
                    "key": key, "source": {"shard": shard, "meta": meta},
                    "num_frames": int(frames), "model": self.loaded.identity,
                    "decode": self.decode,
                    "levels": {n: {"shape": list(c.shape), "dtype": str(c.dtype)}
                               for n, c in levels.items()},
                }  # fmt: skip
                _add(tar, f"{key}.json", json.dumps(info).encode())
                for n, c in levels.items():
                    _add(tar, f"{key}.{n}.npy", _npy(c))
        os.replace(tmp, self.out / name)
        if self.remote:  # uploaded as it completes; only its stats stay in the staging folder
            for f in (self.out / name, self.out / f"{name}.stats.json"):
                upload(f, f"{self.remote}/{f.name}")
            (self.out / name).unlink()
        return stats


def tokenize(loaded: LoadedModel, shards: list[str], out: str | Path, overrides: list[str] = (),
             actors: int = 2, use_gpu: bool = False) -> dict:  # fmt: skip
    """Tokenize every input shard not yet in `out` (a folder, or a URI such as
    `s3://bucket/tokens`: token shards are uploaded as they complete, through a local
    staging folder that holds one at a time); returns the manifest. `actors=0` runs the
    same stages in this process (no Ray); otherwise Ray must be initialised."""
    remote = str(out).rstrip("/") if "://" in str(out) else None
    out = _pull_records(remote) if remote else Path(out)
    try:
        return _tokenize(loaded, shards, out, remote, list(overrides), actors, use_gpu)
    finally:
        if remote:
            shutil.rmtree(out, ignore_errors=True)


def _pull_records(remote: str) -> Path:
    """A local staging folder with the JSON records (manifest, per-shard stats) already at
    `remote`, so a run there resumes and checks the model as a local folder does."""
    staging = Path(tempfile.mkdtemp(prefix="vqtok-tokens-"))
    for uri in list_shards([f"{remote}/*.json"]):
        download(uri, staging / uri.rsplit("/", 1)[1])
    return staging


def _tokenize(loaded: LoadedModel, shards: list[str], out: Path, remote: str | None,
              overrides: list[str], actors: int, use_gpu: bool) -> dict:  # fmt: skip
    cfg = inference_data(loaded, shards, overrides)
    sources = list_shards(cfg.shards)
    if not sources:
        raise ConfigError(f"no shards match {list(shards)}")
    decode = {"resolution": list(cfg.resolutions[0]), "frames": cfg.frame_counts[0],
              "frame_stride": cfg.frame_stride}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    _check_same_model(out, loaded, decode, remote)
    done = {p.name for p in out.glob("*.tar")}
    if remote:
        done |= {u.rsplit("/", 1)[1] for u in list_shards([f"{remote}/*.tar"])}
    todo = [s for s in sources if token_shard_name(s) not in done]
    writer, t0 = ShardWriter(out, loaded, decode, remote), time.perf_counter()
    if todo:
        rows = (plain_rows(loaded, todo, cfg, "tokenize") if actors == 0
                else infer(loaded, todo, cfg, "tokenize", actors=actors, use_gpu=use_gpu))  # fmt: skip
        progress = Progress("tokenize", total=len(todo))
        for row in rows:
            before = len(writer.written)
            writer.add(row)
            progress.update(done=len(writer.written) - before, samples=len(row["keys"]))
        progress.close()
    wall = time.perf_counter() - t0
    if writer.pending:  # cannot happen unless a stage lost rows: say so, write nothing
        raise RuntimeError(f"incomplete shards (rows lost): {sorted(writer.pending)}")
    done |= {e["output"] for e in writer.written}
    entries = [json.loads(p.read_text()) for p in sorted(out.glob("*.tar.stats.json"))
               if p.name.removesuffix(".stats.json") in done]  # fmt: skip
    new = {"samples": sum(e["samples"] for e in writer.written),
           "tokens": sum(e["tokens"] for e in writer.written)}  # fmt: skip
    skipped = Counter()
    for e in entries:
        skipped.update(e["skipped"])
    manifest = {
        "model": loaded.identity, "decode": decode, "shards": entries,
        "totals": {"shards": len(entries), "samples": sum(e["samples"] for e in entries),
                   "tokens": sum(e["tokens"] for e in entries), "skipped": dict(skipped)},
        "this_run": {"shards_written": len(writer.written),
                     "shards_skipped_as_done": len(sources) - len(todo), **new,
                     "wall_s": round(wall, 3), "actors": actors,
                     "samples_per_s": new["samples"] / wall if wall > 0 else 0.0,
                     "tokens_per_s": new["tokens"] / wall if wall > 0 else 0.0},
    }  # fmt: skip
    _write_json(out / MANIFEST, manifest)
    if remote:
        upload(out / MANIFEST, f"{remote}/{MANIFEST}")
    return manifest


def _check_same_model(out: Path, loaded: LoadedModel, decode: dict, remote: str | None) -> None:
    f, where = out / MANIFEST, remote or out
    if not f.is_file():
        return
    old = json.loads(f.read_text())
    for key in ("config_hash", "weights_hash"):
        if old["model"].get(key) != loaded.identity.get(key):
            raise ConfigError(
                f"{where} holds tokens of another model ({key} "
                f"{old['model'].get(key)} != {loaded.identity.get(key)}); use a new --out"
            )
    if old["decode"] != decode:
        raise ConfigError(f"{where} was made with decode {old['decode']}, "
                         f"not {decode}; use a new --out")  # fmt: skip


# ---------------------------------------------------------------- detokenize


def iter_token_samples(path: Path, skipped: Counter | None = None):
    """(info, {level: codes}) of each sample of a token tar, in member order; a sample that
    is refused by the tar reader, lacks its JSON or a level, or does not parse is skipped
    and counted in `skipped` (by reason)."""
    from pipelines.data.tars import iter_tar_samples

    skipped = Counter() if skipped is None else skipped
    for sample in iter_tar_samples(str(path)):
        if "__skip__" in sample:
            skipped[str(sample["__skip__"]).split(":")[0]] += 1
            continue
        try:
            info = json.loads(bytes(sample["json"]))
            levels = {n: np.load(io.BytesIO(bytes(sample[f"{n}.npy"])), allow_pickle=False)
                      for n in info["levels"]}  # fmt: skip
        except (KeyError, ValueError, TypeError, OSError):
            skipped["bad_token_sample"] += 1
            continue
        yield info, levels


@torch.no_grad()
def detokenize_sample(loaded: LoadedModel, info: dict, levels: dict) -> torch.Tensor:
    """Codes of one sample -> float video (3, T, H, W) in [-1, 1] at the decode size."""
    h, w = info["decode"]["resolution"]
    flat = {n: torch.from_numpy(c.astype(np.int64)) for n, c in levels.items()}
    if loaded.video:
        codes = unflatten_codes({n: c[None] for n, c in flat.items()})
        t = info.get("num_frames") or info["decode"]["frames"]  # real frames (an image: 1)
        return loaded.model.detokenize(codes, (t, h, w))[0].float()
    codes = unflatten_codes(flat)  # frames are the batch of an image model
    return loaded.model.detokenize(codes, (h, w)).float().transpose(0, 1)


def detokenize(loaded: LoadedModel, tokens: Path, out: Path, max_samples: int | None = None):
    """Write each sample as `<out>/<token shard>/<key>.mp4` (clips) or `.png` (images)."""
    from pipelines.tracking.media import save_mp4, save_png

    done, skipped = 0, Counter()
    tars = sorted(tokens.glob("*.tar"))
    progress = Progress("detokenize", total=len(tars))
    for tar in tars:
        for info, levels in iter_token_samples(tar, skipped):
            if max_samples is not None and done >= max_samples:
                progress.close()
                return done
            _check_identity(loaded, info, tar)
            x = detokenize_sample(loaded, info, levels)[:, : info["num_frames"]]
            frames = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
            dest = out / tar.stem / info["key"]
            if len(frames) == 1:
                save_png(frames[0], dest.with_suffix(".png"))
            else:
                save_mp4(frames, dest.with_suffix(".mp4"))
            done += 1
            progress.update(samples=1)
        progress.update(done=1)
    progress.close()
    if skipped:
        print(f"[vqtok] detokenize skipped {sum(skipped.values())} samples: {dict(skipped)}")
    return done


def _check_identity(loaded: LoadedModel, info: dict, tar: Path) -> None:
    mine, theirs = loaded.identity, info["model"]
    if mine.get("weights_hash") != theirs.get("weights_hash"):
        raise ConfigError(f"{tar} was made by model {theirs} (weights "
                         f"{theirs.get('weights_hash')}), not {mine.get('source')}")  # fmt: skip


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`tokenize` and `detokenize` share this module; each verb gets its own arguments."""
    if p.prog.endswith("detokenize"):
        p.description = "Token shards back to mp4/png with the model that made them."
        p.epilog = "example: vqtok detokenize --tokens tokens/ --out recon/"
        p.add_argument("--tokens", type=Path, required=True, help="a folder `tokenize` wrote")
        p.add_argument("--out", type=Path, required=True, help="folder for the mp4/png files")
        p.add_argument("--model", help="default: the model named in the tokens' manifest")
        p.add_argument("--max-samples", type=int, default=None, help="decode at most N")
        return
    p.description = "Shards -> token shards with a trained model (Ray Data actors)."
    p.epilog = ("example: vqtok tokenize --model runs:/RUN_ID/model --data 'shards/*.tar' "
                "--out tokens/")  # fmt: skip
    p.add_argument("--model", required=True, help="runs:/<id>/model, models:/<name>/<version>, "
                   "a run, checkpoint or exported model folder")  # fmt: skip
    p.add_argument("--data", nargs="+", required=True, help="input shards (files, folders, globs)")
    p.add_argument("--out", required=True,
                   help="folder or URI (s3://bucket/tokens, any pyarrow.fs URI) for the token shards")  # fmt: skip
    p.add_argument("--actors", type=int, default=2, help="model actors (0: no Ray)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="one GPU per actor, bf16 (default: when the Ray cluster has GPUs)")  # fmt: skip
    p.add_argument(
        "overrides", nargs="*", help="data.key=value (e.g. data.resolutions=[[256,256]])"
    )


def run(args: argparse.Namespace) -> int:
    if args.verb == "detokenize":
        model = args.model or json.loads((args.tokens / MANIFEST).read_text())["model"]["source"]
        n = detokenize(load_model(model), args.tokens, args.out, args.max_samples)
        print(f"[vqtok] {n} samples decoded into {args.out}")
        return 0
    loaded = load_model(args.model)
    gpu = False
    if args.actors:
        from pipelines.cluster.connect import cluster_has_gpus, init_ray

        init_ray()
        gpu = cluster_has_gpus() if args.gpu is None else args.gpu
    manifest = tokenize(loaded, args.data, args.out, args.overrides, args.actors, gpu)
    print(json.dumps({"totals": manifest["totals"], "this_run": manifest["this_run"]}, indent=1))
    print(f"[vqtok] token shards and manifest in {args.out}")
    return 0
