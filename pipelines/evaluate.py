"""Evaluation: reconstruction and codebook metrics over a data set, recon grids, `vqtok eval`.

    metrics, media = evaluate(model, batches, device, video=True)  # media: grid, clip

Metrics come from `vqcore.metrics.ReconMetrics` (PSNR/SSIM per frame, LPIPS only with real
weights, per-resolution and per-frame-count breakdown) plus codebook usage, perplexity and
bits per token over the whole set. The same function runs periodically in training (EMA
weights) and in `vqtok eval --checkpoint PATH --data SHARDS`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.inputs import fold_frames, frame_mask, to_model_input, unfold_frames
from vqcore.metrics import MetricsConfig, ReconMetrics
from vqcore.quantizers import Quantizer


def top_level_quantizers(model: nn.Module) -> list[Quantizer]:
    """The model's quantizers in module order, not counting those nested in another."""
    found: list[Quantizer] = []
    for m in model.modules():
        if isinstance(m, Quantizer) and not any(m in set(q.modules()) for q in found):
            found.append(m)
    return found


def token_budget(quantizers: list[Quantizer], z_q) -> tuple[int, float]:
    """(latent positions of the first quantizer, bits per such position over all of them):
    their product is the bits the batch's tokens take (HFSVQ: F_L's plus F_H's)."""
    zs = z_q if isinstance(z_q, tuple) else (z_q,)
    bits = sum(z.numel() / z.shape[1] * q.bits_per_token for z, q in zip(zs, quantizers))
    positions = zs[0].numel() // zs[0].shape[1]
    return positions, bits / positions


def recon_grid(x: torch.Tensor, x_hat: torch.Tensor, max_items: int = 4, max_frames: int = 4):
    """uint8 (H, W, 3) image: rows = samples, columns = frames, originals left of recons."""
    if x.dim() == 4:
        x, x_hat = x[:, :, None], x_hat[:, :, None]
    b, t = min(max_items, x.shape[0]), min(max_frames, x.shape[2])
    pair = torch.cat([x[:b, :, :t], x_hat[:b, :, :t].clamp(-1, 1)], dim=2)  # (b, C, 2t, H, W)
    rows = [torch.cat(list(pair[i].unbind(1)), dim=-1) for i in range(b)]  # (C, H, 2t·W)
    img = torch.cat(rows, dim=-2)
    return ((img.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()


def side_by_side_clip(x: torch.Tensor, x_hat: torch.Tensor, i: int, frames: int) -> np.ndarray:
    """uint8 (T, H, 2W, 3) of clip i: original left, reconstruction right."""
    pair = torch.cat([x[i, :, :frames], x_hat[i, :, :frames].clamp(-1, 1)], dim=-1)
    return ((pair.float() + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def save_mp4(frames_thwc: np.ndarray, path: Path, fps: int = 8) -> Path:
    """H.264 mp4 through PyAV (even sizes padded, as yuv420p needs)."""
    import av

    t, h, w, _ = frames_thwc.shape
    frames_thwc = np.pad(frames_thwc, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        for frame in frames_thwc:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return path


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    *,
    video: bool,
    max_batches: int | None = None,
    metrics_config: MetricsConfig | None = None,
    autocast=None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics over `batches` (uint8 video dicts), and media of the first batch: `grid` (a
    recon grid image) and, for clips of several frames, `clip` (original | recon frames)."""
    was_training = model.training
    model.eval()
    quantizers = top_level_quantizers(model)
    for q in quantizers:
        q.reset_usage()
    acc = ReconMetrics(metrics_config or MetricsConfig(fid=False))
    media: dict[str, np.ndarray] = {}
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            if batch["video"].shape[0] == 0:
                continue
            x = to_model_input(batch["video"], device)
            mask = frame_mask(batch["num_frames"], x.shape[2]) if "num_frames" in batch else None
            main = quantizers[0] if quantizers else None
            before = main.usage.counts.clone() if main is not None else None
            with autocast or torch.autocast(device.type, enabled=False):
                x_hat, q = model(x if video else fold_frames(x))
            x_hat = x_hat.float()
            if not video:  # back to clips so metrics break down per frame count
                x_hat = unfold_frames(x_hat, x.shape[2])
            positions, bits = token_budget(quantizers, q.z_q) if quantizers else (None, None)
            acc.update(
                x_hat,
                x,
                frame_mask=mask if x.shape[2] > 1 else None,
                code_hist=None if main is None else main.usage.counts - before,
                num_tokens=positions,
                bits_per_token=bits,
            )
            if not media:
                media["grid"] = recon_grid(x, x_hat)
            if "clip" not in media:  # the first clip of several real frames
                real = batch.get("num_frames", torch.full((x.shape[0],), x.shape[2]))
                i = int(torch.as_tensor(real).argmax())
                if int(real[i]) > 1:
                    media["clip"] = side_by_side_clip(x, x_hat, i, int(real[i]))
    finally:
        model.train(was_training)
    metrics = {f"eval/{k}": v for k, v in acc.compute().items() if v is not None}
    for idx, q in enumerate(quantizers):
        name = "quantizer" if len(quantizers) == 1 else f"quantizer{idx}"
        metrics.update({f"eval/{name}_{k}": v for k, v in q.usage_stats().items()})
    return metrics, media


def save_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# --- `vqtok eval` ------------------------------------------------------------------------


def load_for_eval(checkpoint: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The EMA model of a checkpoint folder, rebuilt from the config stored beside it."""
    import yaml

    from pipelines import checkpoint as ckpt
    from vqcore.models import build_model

    ckpt.check_loadable(checkpoint)
    cfg = yaml.safe_load((checkpoint / "config.yaml").read_text())
    model = build_model(cfg["model"])
    state = torch.load(checkpoint / "ema.pt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}
    model.load_state_dict(state)
    return model.to(device), cfg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a checkpoint folder (run/checkpoints/step_N) or a run folder",
    )
    p.add_argument("--data", nargs="+", required=True, help="shards: files, folders or globs")
    p.add_argument("--out", type=Path, default=None, help="default: <checkpoint>/eval")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="data.key=value overrides (e.g. data.batch_size=2)")


def resolve_checkpoint(path: Path) -> Path:
    from pipelines import checkpoint as ckpt

    if (path / "train_state.json").is_file():
        return path
    found = ckpt.latest(path)  # a run folder: its newest complete checkpoint
    if found is None:
        raise SystemExit(f"vqtok eval: {path} is neither a checkpoint nor a run folder with one")
    return found


def run(args: argparse.Namespace) -> int:
    import yaml

    from pipelines.config import from_dict
    from pipelines.data import DataConfig, iter_batches

    checkpoint = resolve_checkpoint(args.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_for_eval(checkpoint, device)
    data = dict(cfg.get("data", {}), shards=list(args.data))
    for item in args.overrides:
        key, _, value = item.partition("=")
        if not key.startswith("data."):
            raise SystemExit(f"vqtok eval: only data.* overrides are taken, got {key!r}")
        data[key.removeprefix("data.")] = yaml.safe_load(value)
    data_cfg = from_dict(DataConfig, data, "data")
    metrics, media = evaluate(
        model, iter_batches(data_cfg, epoch=0), device,
        video=cfg["model"].get("type") == "pvqvae", max_batches=args.max_batches,
    )  # fmt: skip
    out = args.out or checkpoint / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if "grid" in media:
        save_png(media["grid"], out / "recon.png")
    if "clip" in media:
        save_mp4(media["clip"], out / "recon.mp4")
    print(json.dumps(metrics, indent=1))
    print(f"[vqtok] eval results in {out}")
    return 0
