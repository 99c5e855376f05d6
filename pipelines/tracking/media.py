"""Files the tracker renders: image grids as PNG and codebook-usage plots (matplotlib Agg).

No pyplot and no global backend switch: figures are drawn on an Agg canvas directly, so
this is safe in workers and next to other matplotlib users.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["to_hwc_uint8", "save_png", "save_mp4", "usage_plot", "curve_plot"]

_CHANNELS = (1, 3, 4)


def to_hwc_uint8(image: Any) -> np.ndarray:
    """A numpy array or torch tensor -> (H, W, C) uint8, C in {1, 3, 4}.

    Accepts HWC uint8, CHW or HWC float in [0, 1] (clipped), or HW. A 3-dim array whose
    first axis is 1/3/4 and last axis is not is read as channel-first.
    """
    if hasattr(image, "detach"):  # torch tensor, without importing torch here
        image = (
            image.detach().float().cpu().numpy()
            if image.is_floating_point()
            else (image.detach().cpu().numpy())
        )
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"image must be HW, HWC or CHW, got shape {tuple(a.shape)}")
    if a.shape[0] in _CHANNELS and a.shape[-1] not in _CHANNELS:
        a = a.transpose(1, 2, 0)
    if a.shape[-1] not in _CHANNELS:
        raise ValueError(f"image needs 1, 3 or 4 channels, got shape {tuple(a.shape)}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        return np.clip(a, 0, 255).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float32), nan=0.0)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(image: Any, path: str | Path) -> Path:
    """Write `image` (see `to_hwc_uint8`) as a PNG."""
    from PIL import Image

    a = to_hwc_uint8(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path, format="PNG")
    return path


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


def usage_plot(codebook_json: str | Path, path: str | Path, title: str = "") -> Path:
    """Plot per-code counts from a quantizer's `codebook.json` (`counts`: (G, K) or (K,)).

    Top: counts by code index, one line per codebook. Bottom: counts sorted (rank-frequency,
    log scale), which shows dead codes and collapse at a glance.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    info = json.loads(Path(codebook_json).read_text())
    if "counts" not in info:
        raise ValueError(f"{codebook_json} has no 'counts'")
    counts = np.asarray(info["counts"], dtype=np.float64)
    counts = counts.reshape(1, -1) if counts.ndim <= 1 else counts.reshape(-1, counts.shape[-1])
    groups, num_codes = counts.shape
    used = (counts > 0).mean()
    p = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
    perplexity = np.exp(-(p * np.log(np.where(p > 0, p, 1.0))).sum(1)).mean()

    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    stride = max(1, math.ceil(num_codes / 4096))  # keep huge (e.g. LFQ) codebooks drawable
    for g in range(min(groups, 16)):
        row = counts[g]
        if stride > 1:
            row = np.pad(row, (0, (-len(row)) % stride)).reshape(-1, stride).max(1)
        edges = np.minimum(np.arange(len(row) + 1) * stride, num_codes)
        top.stairs(row, edges, fill=groups == 1, lw=0.8, label=f"codebook {g}")
        bottom.plot(np.arange(1, num_codes + 1), np.sort(counts[g])[::-1], lw=0.8)
    top.set(xlabel="code index" + (f" (max over {stride})" if stride > 1 else ""), ylabel="count")
    bottom.set(xlabel="rank", ylabel="count, sorted")
    bottom.set_yscale("symlog", linthresh=1.0)  # 0 (dead codes) stays visible
    if 1 < groups <= 8:
        top.legend(fontsize=7)
    head = f"{title}: " if title else ""
    fig.suptitle(
        f"{head}{groups}x{num_codes} codes, {used:.1%} used, perplexity {perplexity:.1f}",
        fontsize=10,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def curve_plot(points: list[tuple[int, float]], path: str | Path, references: dict[str, float],
               ylabel: str = "PSNR dB", title: str = "") -> Path:  # fmt: skip
    """A metric over steps with horizontal reference lines (e.g. validation PSNR beside
    bicubic resampling at the model's rate and each clip's mean colour): whether and when
    a tokenizer beats the trivial references, at a glance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps, values = zip(*points) if points else ((), ())
    ax.plot(steps, values, marker="o", lw=1.5, label="model")
    for (name, value), style in zip(references.items(), ("--", ":", "-.", (0, (1, 4)))):
        ax.axhline(value, ls=style, lw=1.0, color="grey", label=f"{name} {value:.2f}")
    ax.set(xlabel="step", ylabel=ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
