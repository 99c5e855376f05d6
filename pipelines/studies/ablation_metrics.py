"""Metrics the ablation studies need beyond `pipelines.inference.evaluate`, computed once per run
after training, on the run's EMA checkpoint and the same validation batches:

- `eval/hf_mse`: MSE between the finest Haar DWT detail bands (LH, HL, HH) of reconstruction
  and original, per frame, on the [-1, 1] scale of `eval/mse` (`pipelines.inference.evaluate`): "the
  error in the highest wavelet band" (HFSVQ, seed 000 supp. sec. 2.2: more subspaces give
  sharper high frequencies);
- `eval/low_psnr`, `eval/low_mse`, `eval/low_hf_mse`: the same scores for F_L's output alone
  (HFSVQ models only; PSNR per frame as `eval/psnr`): F_L alone versus F_L + F_H within one
  trained model;
- `eval/encode_ms`: `model.tokenize` (encoder + code search) per image (per clip for video
  models): per batch the fastest of `TIMING_REPEATS` calls (timeit's rule: slower calls
  measure other processes, e.g. a study's parallel run, not the code), mean over the
  batches; `eval/quantize_ms`: the code search alone, timed the same way
  (`model.quantizer.encode` of the encoder's latents), where the model has one quantizer
  (HR-VQVAE's claim: the tree's local search is faster, seed 002 Table 2);
- `eval/codebook_params`: floats in the model's codebooks (LooC: equal-parameter comparison);
- `eval/quantizer_usage_layerI`, `eval/quantizer_perplexity_layerI`: where the quantizer
  reports per-layer usage (HR-VQ: the code paths of layer I), over the same batches.

Padded frames (`num_frames`) are left out of every per-frame error.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from pipelines.data.inputs import fold_frames, frame_mask, to_model_input
from pipelines.inference.evaluate import top_level_quantizers
from vqcore.metrics import psnr
from vqcore.quantizers.codebook import Codebook
from vqcore.spectral import dwt


def codebook_params(model: torch.nn.Module) -> int:
    """Floats in the code vectors of the model's codebooks (LFQ/FSQ have none)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, Codebook))


def _frame_errors(x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per frame (N,) of [-1, 1] images (N, C, H, W), the reconstruction clamped as
    `ReconMetrics` does: PSNR, pixel MSE and finest-detail-band MSE."""
    a, b = x_hat.float().clamp(-1, 1), x.float()
    h, w = a.shape[-2] // 2 * 2, a.shape[-1] // 2 * 2  # even sizes for one Haar level
    da, db = dwt(a[..., :h, :w]), dwt(b[..., :h, :w])  # (N, 4, C, H/2, W/2); band 0 = LL
    return {"psnr": psnr(a, b, data_range=2.0), "mse": (a - b).pow(2).flatten(1).mean(1),
            "hf_mse": (da[:, 1:] - db[:, 1:]).pow(2).flatten(1).mean(1)}  # fmt: skip


TIMING_REPEATS = 5


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _fastest(fn, x: torch.Tensor, device: torch.device) -> float:
    """Seconds per sample of `fn(x)`: the fastest of `TIMING_REPEATS` calls."""
    best = float("inf")
    for _ in range(TIMING_REPEATS):
        t0 = _clock(device)
        fn(x)
        best = min(best, _clock(device) - t0)
    return best / x.shape[0]


@torch.no_grad()
def extra_metrics(
    model: torch.nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    *,
    video: bool,
    max_batches: int,
) -> dict[str, float]:
    model.eval()
    sums: dict[str, float] = {}
    frames, timed, encode_s, quantize_s = 0, 0, 0.0, 0.0
    low = getattr(model, "low", None) if hasattr(model, "high") else None  # HFSVQ's F_L
    quantizers = top_level_quantizers(model)
    for q in quantizers:  # counted by the forward passes below (not by tokenize)
        q.reset_usage()
    single = quantizers[0] if len(quantizers) == 1 and hasattr(model, "encode") else None
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        if batch["video"].shape[0] == 0:
            continue
        x = to_model_input(batch["video"], device)  # (B, C, T, H, W)
        b, t = x.shape[0], x.shape[2]
        mask = frame_mask(batch["num_frames"], t) if "num_frames" in batch else None
        keep = (mask if mask is not None else torch.ones(b, t, dtype=torch.bool)).reshape(-1)
        x_in = x if video else fold_frames(x)
        if i == 0:  # warm-up, untimed: one-off costs (allocations, kernel choice)
            model.tokenize(x_in)
        encode_s += _fastest(model.tokenize, x_in, device)
        if single is not None:
            quantize_s += _fastest(single.encode, model.encode(x_in), device)
        timed += 1
        x_hat, _ = model(x_in)
        x_hat = x_hat.float()
        # per frame, in (B·T) order whatever the model's layout
        ref = fold_frames(x)
        got = fold_frames(x_hat) if video else x_hat
        scores = {"hf_mse": _frame_errors(got, ref)["hf_mse"]}
        if low is not None:  # F_L alone, same frames
            scores |= {f"low_{k}": v for k, v in _frame_errors(low(x_in)[0], ref).items()}
        for key, value in scores.items():
            sums[key] = sums.get(key, 0.0) + float(value[keep.to(value.device)].sum())
        frames += int(keep.sum())
    out: dict[str, float] = {"eval/codebook_params": float(codebook_params(model))}
    if len(quantizers) == 1:  # per-layer usage (HR-VQ's code paths of each layer)
        stats = quantizers[0].usage_stats()
        out.update({f"eval/quantizer_{k}": v for k, v in stats.items() if "layer" in k})
    if frames:
        out.update({f"eval/{k}": v / frames for k, v in sums.items()})
    if timed:
        out["eval/encode_ms"] = 1000 * encode_s / timed
        if single is not None:
            out["eval/quantize_ms"] = 1000 * quantize_s / timed
    return out


def run_extra_metrics(cfg, run_dir) -> dict[str, float]:
    """`extra_metrics` of a finished run: its newest checkpoint's EMA model on the run's
    validation batches (`train.eval_shards`, `train.eval_batches`), on CPU or the GPU."""
    from pipelines.store import checkpoint as ckpt
    from pipelines.store.models import load_model
    from pipelines.training.sessions import eval_stream

    found = ckpt.latest(run_dir)
    if found is None:
        return {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(found).model.to(device)
    video = model.config.takes_clips
    return extra_metrics(model, eval_stream(cfg), device, video=video,
                         max_batches=cfg.train.eval_batches)  # fmt: skip
