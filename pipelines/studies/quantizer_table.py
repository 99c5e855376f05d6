"""`vqtok quantizers`: every quantizer family fitted to real image patches, as a table.

Patches: 4×4 RGB patches of the photos bundled with scikit-image, laid out channel-first as a
(B, 48, H/4, W/4) feature map (`pixel_unshuffle`), so spatial quantizers (LooC's
interpolation, the pyramid) see real spatial structure. Each family is trained with Adam on
||z_q - z||² + its own loss for a fixed number of steps on training photos, then scored on a
held-out photo: quantization MSE, PSNR of the reconstructed patches, codebook usage over
the held-out set, and bits per latent position.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from vqcore.quantizers import build

PATCH = 4
DIM = 3 * PATCH * PATCH
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry")
TEST_PHOTO = "chelsea"

# One budget for all: about 8 bits per latent position (the bits column shows the exact
# figure; LooC with α = 2 spends α² times more, on the interpolated grid).
FAMILIES: dict[str, dict] = {
    "vq": {"type": "vq", "codebook_size": 256},
    "vq-ema-cvq": {"type": "vq", "codebook_size": 256, "update": "ema", "cvq": True},
    "gvq": {"type": "gvq", "codebook_size": 256},
    "lfq": {"type": "lfq", "codebook_dim": 8},
    "fsq": {"type": "fsq", "levels": [4, 4, 4, 4]},
    "pq": {"type": "pq", "num_subspaces": 2, "codebook_size": 16},
    "looc": {"type": "looc", "codebook_dim": 24, "codebook_size": 16, "alpha": 1},
    "looc-a2": {"type": "looc", "codebook_dim": 24, "codebook_size": 16, "alpha": 2},
    "hrvq": {"type": "hrvq", "num_layers": 2, "codebook_size": 16},
    "rvq": {"type": "rvq", "num_quantizers": 2, "inner": {"type": "vq", "codebook_size": 16}},
    "rvq_lfq": {
        "type": "rvq_lfq",
        "num_quantizers": 2,
        "inner": {"type": "lfq", "codebook_dim": 4},
    },
    "pvq": {"type": "pyramid", "inner": {"type": "lfq", "codebook_dim": 6}},
    "psvq": {"type": "pyramid", "inner": {"type": "vq", "codebook_size": 64}},
}


def photo_features(name: str, size: int = 128) -> torch.Tensor:
    """A (1, 48, size/4, size/4) map of 4×4 RGB patches in [-1, 1] from skimage.data."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    x = torch.from_numpy(img[..., :3]).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="area") * 2 - 1
    return F.pixel_unshuffle(x, PATCH)


def fit_and_score(spec: dict, train: torch.Tensor, test: torch.Tensor, steps: int) -> dict:
    torch.manual_seed(0)
    q = build({**spec, "dim": DIM})
    opt = torch.optim.Adam(q.parameters(), lr=3e-3) if list(q.parameters()) else None
    t0 = time.perf_counter()
    q.train()
    for _ in range(steps):
        out = q(train)
        loss = F.mse_loss(out.z_q, train) + out.loss
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    q.eval()
    q.reset_usage()
    with torch.no_grad():
        out = q(test)
    mse = F.mse_loss(out.z_q, test).item()
    return {
        "mse": mse,
        "psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12)),  # data range 2 ([-1, 1])
        "usage": q.usage_stats()["usage"],
        "bits_per_token": float(out.metrics["bits_per_token"]),
        "params": sum(p.numel() for p in q.parameters()) + sum(b.numel() for b in q.buffers()),
        "fit_s": time.perf_counter() - t0,
    }


def quantizer_table(
    steps: int = 100, families: list[str] | None = None, progress: bool = False
) -> list[dict]:
    """One row per family; with `progress`, a line on stderr as each one is fitted."""
    train = torch.cat([photo_features(n) for n in TRAIN_PHOTOS])
    test = photo_features(TEST_PHOTO)
    rows, names = [], families or list(FAMILIES)
    for i, name in enumerate(names):
        try:
            rows.append({"family": name, **fit_and_score(FAMILIES[name], train, test, steps)})
        except ValueError as exc:  # a family not registered in this build
            rows.append({"family": name, "error": str(exc)})
        if progress:
            done = rows[-1].get("fit_s")
            took = f"{done:.1f} s" if done is not None else "error"
            print(f"[vqtok] {i + 1}/{len(names)} {name}: {took}", file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'quantizer':<20}{'MSE':>9}{'PSNR dB':>9}{'usage':>8}{'bits/tok':>10}{'params+bufs':>13}{'fit s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['family']:<20}  error: {r['error']}")
            continue
        lines.append(
            f"{r['family']:<20}{r['mse']:>9.4f}{r['psnr_db']:>9.2f}{r['usage']:>8.2f}"
            f"{r['bits_per_token']:>10.1f}{r['params']:>13,d}{r['fit_s']:>7.1f}"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=100, help="Adam steps per quantizer")
    p.add_argument("--families", nargs="*", choices=list(FAMILIES), default=None)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"Fitting quantizers to 4x4 RGB patches of {', '.join(TRAIN_PHOTOS)}; "
        f"scoring on held-out '{TEST_PHOTO}' ({args.steps} steps each)\n",
        flush=True,
    )
    print(format_table(quantizer_table(args.steps, args.families, progress=True)))
    return 0
