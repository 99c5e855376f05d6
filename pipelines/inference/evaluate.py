"""Evaluation as a library: reconstruction and codebook metrics over batches, recon grids.

    metrics, media = evaluate(model, batches, device, video=True)  # media: grid, clip

Metrics come from `vqcore.metrics.ReconMetrics` (PSNR/SSIM per frame, LPIPS only with real
weights, per-resolution and per-frame-count breakdown) plus codebook usage, perplexity and
bits per token over the whole set. The same function runs periodically in training (EMA
weights) and in `vqtok eval` (`pipelines.inference.eval_job`), whose Ray Data actors
merge `EvalAccumulator` states.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from pipelines.data.inputs import fold_frames, frame_mask, to_model_input, unfold_frames
from vqcore.metrics import MetricsConfig, ReconMetrics
from vqcore.quantizers import Quantizer
from vqcore.quantizers.base import CodeUsage
from vqcore.references import BICUBIC_FACTORS


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


def recon_grid(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    num_frames: torch.Tensor | None = None,
    max_items: int = 4,
    max_frames: int = 4,
    min_width: int = 512,
) -> np.ndarray:
    """uint8 (H, W, 3) grid a person can read: per sample two rows, its input frames above
    their reconstructions; columns are frames (labelled t=0, 1, ...). A clip's padded
    frames (past `num_frames`) are not shown: their cells are hatched grey. Single frames
    (images) go side by side instead, one column a sample (#0, #1, ...), so the grid is one
    screen high. Enlarged by an integer nearest-neighbour factor to at least `min_width`
    pixels wide."""
    if x.dim() == 4:
        x, x_hat = x[:, :, None], x_hat[:, :, None]
    column = "t="
    if x.shape[2] == 1:  # samples as the columns of one row pair
        x, x_hat = (v[:max_items].transpose(0, 2) for v in (x, x_hat))
        num_frames, max_frames, column = None, max_items, "#"
    b, t = min(max_items, x.shape[0]), min(max_frames, x.shape[2])
    h, w = x.shape[-2:]
    real = [t] * b if num_frames is None else [min(t, int(n)) for n in num_frames[:b]]
    to_u8 = lambda v: ((v.float().clamp(-1, 1) + 1) * 127.5).round().byte()  # noqa: E731
    grid = torch.empty(3, 2 * b * h, t * w, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    hatch = torch.where((yy + xx) % 8 < 4, 96, 160).to(torch.uint8).expand(3, h, w)
    for i in range(b):
        for j in range(t):
            for row, src in enumerate((x, x_hat)):
                cell = to_u8(src[i, :, j].cpu()) if j < real[i] else hatch
                y0 = (2 * i + row) * h
                grid[:, y0 : y0 + h, j * w : (j + 1) * w] = cell
    scale = max(1, -(-min_width // (t * w)))
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return _label(grid.permute(1, 2, 0).numpy(), b, t, h * scale, w * scale, column)


def _label(img: np.ndarray, items: int, frames: int, h: int, w: int, column: str) -> np.ndarray:
    """A header naming each column (`column` + its index) and "input"/"recon" at each row."""
    from PIL import Image, ImageDraw

    pad_top, pad_left = 14, 40
    canvas = Image.new("RGB", (img.shape[1] + pad_left, img.shape[0] + pad_top), "white")
    canvas.paste(Image.fromarray(img), (pad_left, pad_top))
    draw = ImageDraw.Draw(canvas)
    for j in range(frames):
        draw.text((pad_left + j * w + 2, 1), f"{column}{j}", fill="black")
    for r in range(2 * items):
        draw.text((2, pad_top + r * h + h // 2 - 5), "input" if r % 2 == 0 else "recon",
                  fill="black")  # fmt: skip
    return np.asarray(canvas)


def side_by_side_clip(x: torch.Tensor, x_hat: torch.Tensor, i: int, frames: int) -> np.ndarray:
    """uint8 (T, H, 2W, 3) of clip i: original left, reconstruction right."""
    pair = torch.cat([x[i, :, :frames], x_hat[i, :, :frames].clamp(-1, 1)], dim=-1)
    return ((pair.float() + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


class EvalAccumulator:
    """Exact, mergeable evaluation state of one model: `ReconMetrics` (PSNR/SSIM summed per
    frame) and each top-level quantizer's code histogram. `state()` of one process or actor
    is merged into another's with `merge()`; `compute()` gives the `eval/*` metrics."""

    def __init__(self, model: nn.Module, device: torch.device, *, video: bool,
                 metrics_config: MetricsConfig | None = None, autocast=None):  # fmt: skip
        self.model, self.device, self.video, self.autocast = model, device, video, autocast
        self.quantizers = top_level_quantizers(model)
        self.hists = [torch.zeros_like(q.usage.counts) for q in self.quantizers]
        self.metrics = ReconMetrics(metrics_config or MetricsConfig(fid=False))

    @torch.no_grad()
    def update(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one uint8 video batch; returns (x, x_hat) in [-1, 1], (B, C, T, H, W)."""
        x = to_model_input(batch["video"], self.device)
        mask = frame_mask(batch["num_frames"], x.shape[2]) if "num_frames" in batch else None
        before = [q.usage.counts.clone() for q in self.quantizers]
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast or torch.autocast(self.device.type, enabled=False):
                x_hat, q = self.model(x if self.video else fold_frames(x))
        finally:
            self.model.train(was_training)
        x_hat = x_hat.float()
        if not self.video:  # back to clips so metrics break down per frame count
            x_hat = unfold_frames(x_hat, x.shape[2])
        deltas = [q.usage.counts - b for q, b in zip(self.quantizers, before)]
        for h, d in zip(self.hists, deltas):
            h += d.to(h.device)
        positions, bits = token_budget(self.quantizers, q.z_q) if self.quantizers else (None, None)
        self.metrics.update(
            x_hat, x, frame_mask=mask if x.shape[2] > 1 else None,
            code_hist=deltas[0] if deltas else None, num_tokens=positions, bits_per_token=bits,
        )  # fmt: skip
        return x, x_hat

    def state(self) -> dict[str, np.ndarray]:
        out = {f"m.{k}": v.cpu().numpy() for k, v in self.metrics.state_dict().items()}
        out.update({f"hist{i}": h.cpu().numpy() for i, h in enumerate(self.hists)})
        return out

    def merge(self, state: dict[str, np.ndarray]) -> None:
        self.metrics.merge({k[2:]: torch.from_numpy(v) for k, v in state.items()
                            if k.startswith("m.")})  # fmt: skip
        for i, h in enumerate(self.hists):
            h += torch.from_numpy(state[f"hist{i}"]).to(h)

    def compute(self) -> dict[str, float]:
        metrics = {f"eval/{k}": v for k, v in self.metrics.compute().items() if v is not None}
        for idx, h in enumerate(self.hists):
            name = "quantizer" if len(self.hists) == 1 else f"quantizer{idx}"
            metrics.update({f"eval/{name}_{k}": float(v) for k, v in CodeUsage.stats(h).items()})
        return metrics


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
    acc = EvalAccumulator(model, device, video=video, metrics_config=metrics_config,
                          autocast=autocast)  # fmt: skip
    media: dict[str, np.ndarray] = {}
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if batch["video"].shape[0] == 0:
            continue
        x, x_hat = acc.update(batch)
        media = media or first_media(x, x_hat, batch)
    return acc.compute(), media


def first_media(x: torch.Tensor, x_hat: torch.Tensor, batch: dict) -> dict[str, np.ndarray]:
    """A recon grid of the batch and, if it has clips of several frames, its longest clip."""
    real = batch.get("num_frames", torch.full((x.shape[0],), x.shape[2]))
    media = {"grid": recon_grid(x, x_hat, torch.as_tensor(real))}
    i = int(torch.as_tensor(real).argmax())
    if int(real[i]) > 1:
        media["clip"] = side_by_side_clip(x, x_hat, i, int(real[i]))
    return media


def reference_table(metrics: dict, prefix: str = "eval/") -> str:
    """The model's PSNR/SSIM beside the trivial references on the same frames (each clip's
    mean colour; bicubic down/up at each factor, its compression ratio f²), the bicubic at
    the model's rate marked, and whether the model beats it."""
    get = lambda k: metrics.get(prefix + k)  # noqa: E731
    fmt = lambda v: "    -" if v is None else f"{v:5.2f}"  # noqa: E731
    ratio, bits = get("compression_ratio"), get("bits_per_token")
    rate = get("reference_rate_factor")
    model = "model" + (f" ({ratio:.1f}x, {bits:.3g} bits/position)" if ratio and bits else "")
    rows = [(model, get("psnr"), get("ssim")),
            ("mean colour of each clip", get("reference_mean_colour_psnr"),
             get("reference_mean_colour_ssim"))]  # fmt: skip
    for f in BICUBIC_FACTORS:
        if get(f"reference_bicubic_x{f}_psnr") is not None:
            mark = "  <- at the model's rate" if rate == f else ""
            rows.append((f"bicubic x{f} ({f * f}x){mark}", get(f"reference_bicubic_x{f}_psnr"),
                         get(f"reference_bicubic_x{f}_ssim")))  # fmt: skip
    width = max(len(r[0]) for r in rows)
    lines = [f"  {'':<{width}}  PSNR dB  SSIM"]
    lines += [f"  {name:<{width}}  {fmt(p)}   {fmt(s)}" for name, p, s in rows]
    beats = get("beats_rate")
    if beats is not None:
        verdict = "yes" if beats else "NO: it has not learned to compress better than resampling"
        lines.append(f"  beats bicubic at its rate: {verdict}")
    return "\n".join(lines)
