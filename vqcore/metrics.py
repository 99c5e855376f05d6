"""Reconstruction and codebook metrics over a whole evaluation set, mergeable across workers.

Scores are per image (per frame for video), then averaged over all frames of the set: PSNR,
SSIM (torchmetrics), LPIPS (only with real backbone weights), rFID (torchmetrics FID with
local Inception weights), the colour (`chroma_sums`: chroma MSE, saturation kept), and
codebook usage / perplexity / bits per token / compression ratio from accumulated code counts.
Inputs are (B, C, H, W) or (B, C, T, H, W), channel-first, in [data_min, data_min + data_range]
= [-1, 1] by default (so the PSNR peak is 2).

`ReconMetrics` keeps only sums and counts (float64 tensors) in `state_dict()`, so workers can be
merged exactly (`merge`, `all_reduce`, or summing state dicts from Ray actors) — never an
average of averages.

    m = ReconMetrics(MetricsConfig())
    for x in loader:
        out = model(x); m.update(out.x_hat, x, code_hist=h, num_tokens=n, bits_per_token=b)
    m.all_reduce(); print(m.compute())   # {"psnr": .., "psnr/256x256": .., "psnr/t16": .., ...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vqcore import references
from vqcore.losses import Perceptual, PerceptualConfig, check_pair, frames, warn_once
from vqcore.ops.dist import is_distributed

# torch-fidelity's FID Inception (TF 2015-12-05 graph), as its downloader names it
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
SSIM_MIN_SIZE = 11  # the 11×11 Gaussian window (σ = 1.5) must fit inside a frame


# --- per-frame scores ------------------------------------------------------------------------


def psnr(
    x_hat: torch.Tensor, x: torch.Tensor, data_range: float = 2.0, cap_db: float = 100.0
) -> torch.Tensor:
    """PSNR = 10·log10(data_range² / MSE) of each image (N,) or frame (B, T), in fp32.

    Written out rather than taken from torchmetrics so it stays per frame and finite: an exact
    reconstruction (MSE = 0) scores `cap_db` instead of +inf, which would swamp the average.
    Matches `skimage.metrics.peak_signal_noise_ratio` (tests/test_metrics.py)."""
    check_pair(x_hat, x)
    err = (x_hat.float() - x.float()).square()
    mse = err.mean(dim=(1, 3, 4) if x.dim() == 5 else (1, 2, 3))
    floor = data_range**2 * 10 ** (-cap_db / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(floor))


def ssim(
    x_hat: torch.Tensor, x: torch.Tensor, data_min: float = -1.0, data_range: float = 2.0,
    crop: bool = True,
) -> torch.Tensor:
    """SSIM (Wang et al. 2004, eq. 13; Gaussian 11×11 window, σ = 1.5, K = (0.01, 0.03)) of each
    image (N,) or frame (B, T), channels averaged, via torchmetrics.

    Intensities are first mapped to [0, 1]: SSIM's luminance term is not shift-invariant, so
    scoring [-1, 1] directly gives a different number. With `crop`, the SSIM map is averaged
    over the valid region only (borders of 5 px dropped), as in Wang et al.'s reference code and
    scikit-image; torchmetrics alone averages over reflect-padded borders too."""
    from torchmetrics.functional.image import structural_similarity_index_measure  # heavy import

    check_pair(x_hat, x)
    a, b = frames(x_hat).float(), frames(x).float()
    if min(a.shape[-2:]) < SSIM_MIN_SIZE:
        raise ValueError(f"SSIM needs frames of at least {SSIM_MIN_SIZE}x{SSIM_MIN_SIZE}, "
                         f"got {tuple(a.shape[-2:])}")
    a, b = (a - data_min) / data_range, (b - data_min) / data_range
    full, ssim_map = structural_similarity_index_measure(
        a, b, data_range=1.0, reduction="none", return_full_image=True
    )
    if crop:
        pad = (SSIM_MIN_SIZE - 1) // 2
        full = ssim_map[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))
    return full.reshape(x.shape[0], x.shape[2]) if x.dim() == 5 else full


def chroma_sums(fa: torch.Tensor, fb: torch.Tensor) -> dict[str, float]:
    """Colour of RGB frames (N, 3, H, W), reconstruction `fa` against input `fb`, as sums
    over frames: `chroma_mse` = the MSE of chroma, each pixel's RGB minus its channel mean
    (the grey axis removed: an orthogonal projection, so mse = luma part + chroma part), and
    the chroma power (mean square) of each, whose ratio `compute` gives as `chroma_kept`:
    1 keeps the input's colour saturation, 0 is a grey picture. PSNR alone hides a model
    that has learned luma and not colour (BENCHMARKS.md "Colour")."""
    ca, cb = (v - v.mean(1, keepdim=True) for v in (fa.float(), fb.float()))
    per_frame = lambda v: v.square().mean(dim=(1, 2, 3)).double().sum().item()  # noqa: E731
    return {"chroma_mse": per_frame(ca - cb), "chroma_power": per_frame(ca),
            "chroma_power_in": per_frame(cb)}


# --- codebook metrics ------------------------------------------------------------------------


def code_histogram(codes: torch.Tensor | tuple[torch.Tensor, ...], num_codes: int) -> torch.Tensor:
    """Counts (G, K) of integer codes in [0, num_codes): one row per tensor of a tuple (levels
    or scales), one row for a single tensor. For quantizers with several codebooks per level,
    use their own `CodeUsage.histogram` instead."""
    levels = codes if isinstance(codes, (tuple, list)) else (codes,)
    rows = []
    for c in levels:
        if c.numel() and (c.min() < 0 or c.max() >= num_codes):
            raise ValueError(f"codes must lie in [0, {num_codes}), got [{c.min()}, {c.max()}]")
        rows.append(torch.bincount(c.reshape(-1).long(), minlength=num_codes))
    return torch.stack(rows).double()


def code_stats(hist_gk: torch.Tensor) -> dict[str, float]:
    """usage: mean over codebooks of the fraction of codes seen at least once;
    perplexity: mean of exp(H(p)); entropy_bits: mean of H(p)/ln 2, p = counts / total."""
    hist = hist_gk.double()
    p = hist / hist.sum(1, keepdim=True).clamp_min(1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1)
    return {
        "usage": (hist > 0).double().mean().item(),
        "perplexity": entropy.exp().mean().item(),
        "entropy_bits": (entropy / math.log(2)).mean().item(),
    }


# --- rFID ------------------------------------------------------------------------------------


def build_fid(weights_path: str | None = None):
    """torchmetrics FID (Heusel et al., arXiv:1706.08500) on local Inception weights, or
    (None, reason). `weights_path` None: look in `$TORCH_HOME/hub/checkpoints/INCEPTION_FILE`."""
    path = Path(weights_path).expanduser() if weights_path else (
        Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    if not path.is_file():
        return None, f"no Inception weights at {path} (set metrics.fid_weights_path)"
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        fid = FrechetInceptionDistance(
            feature=2048, feature_extractor_weights_path=str(path), sync_on_compute=False)
    except ModuleNotFoundError as e:  # torch-fidelity missing
        return None, f"rFID needs torch-fidelity ({e})"
    return fid, ""


# --- the accumulator -------------------------------------------------------------------------


@dataclass
class MetricsConfig:
    data_min: float = -1.0  # low end of the input range
    data_range: float = 2.0  # PSNR peak: 2 for [-1, 1], 1 for [0, 1], 255 for 8-bit values
    clamp: bool = True  # clamp reconstructions into the input range before scoring
    psnr_cap_db: float = 100.0
    ssim: bool = True
    ssim_crop: bool = True
    lpips: PerceptualConfig | None = field(default_factory=PerceptualConfig)  # None: off
    fid: bool = True  # computed only where Inception weights are found
    fid_weights_path: str | None = None
    breakdown: bool = True  # also per resolution ("256x256") and frame count ("t16")
    references: bool = True  # score the mean colour and bicubic resampling on the same frames
    chunk: int = 16  # frames per LPIPS / SSIM / Inception call (bounds memory)


class ReconMetrics:
    """Accumulates sums and counts per batch; `compute()` turns them into set-level metrics."""

    def __init__(self, config: MetricsConfig | None = None, perceptual: Perceptual | None = None,
                 fid=None):
        """perceptual / fid: reuse already-built modules (e.g. the loss's LPIPS); else they
        are built from the config, and are `None` with a reason in `unavailable`."""
        self.config = config = config or MetricsConfig()
        if config.data_range <= 0:
            raise ValueError(f"metrics.data_range must be > 0, got {config.data_range}")
        self.unavailable: dict[str, str] = {}
        if perceptual is None and config.lpips is not None:
            perceptual = Perceptual(config.lpips)
        self.perceptual = perceptual if perceptual is not None and perceptual.available else None
        if self.perceptual is None:
            self.unavailable["lpips"] = (
                "off (metrics.lpips = None)" if config.lpips is None and perceptual is None
                else "no LPIPS backbone weights found (a random backbone is never scored)")
        if fid is None and config.fid:
            fid, reason = build_fid(config.fid_weights_path)
            if fid is None:
                warn_once("rfid", f"rFID unavailable: {reason}")
                self.unavailable["rfid"] = reason
        elif not config.fid:
            self.unavailable["rfid"] = "off (metrics.fid = false)"
        if fid is not None:
            fid.sync_on_compute = False  # ReconMetrics.all_reduce sums its state, once
        self.fid = fid
        self._fid_keys = [] if fid is None else sorted(fid.metric_state)
        self.reset()

    # -- state
    def reset(self) -> None:
        self._state: dict[str, torch.Tensor] = {}
        if self.fid is not None:
            self.fid.reset()

    def _add(self, key: str, value) -> None:
        v = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        if key in self._state and self._state[key].shape != v.shape:
            raise ValueError(f"metrics: {key} changed shape {tuple(self._state[key].shape)} "
                             f"-> {tuple(v.shape)}")
        self._state[key] = self._state[key] + v if key in self._state else v.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every sum and count as a tensor; summing two state dicts key-wise merges them."""
        sd = {k: v.clone() for k, v in self._state.items()}
        for k in self._fid_keys:
            sd[f"fid.{k}"] = getattr(self.fid, k).detach().cpu().clone()
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self._state = {k: v.double().cpu().clone() for k, v in sd.items() if not k.startswith("fid.")}
        for k in self._fid_keys:
            if f"fid.{k}" in sd:
                cur = getattr(self.fid, k)
                setattr(self.fid, k, sd[f"fid.{k}"].to(cur.device, cur.dtype))
            self.fid._computed = None  # torchmetrics caches compute() until the next update
            self.fid._update_count = max(self.fid._update_count, 1)  # state loaded = updated

    def merge(self, other: ReconMetrics | dict[str, torch.Tensor]) -> ReconMetrics:
        """Add another accumulator (or its state dict) into this one; returns self."""
        other_sd = other.state_dict() if isinstance(other, ReconMetrics) else other
        sd = self.state_dict()
        for k, v in other_sd.items():
            if k.startswith("fid.") and self.fid is None:
                raise ValueError("metrics.merge: the other accumulator has rFID state, this not")
            sd[k] = sd[k] + v.to(sd[k].dtype) if k in sd else v.clone()
        self.load_state_dict(sd)
        return self

    def all_reduce(self) -> ReconMetrics:
        """Sum the state over all ranks (identity without a process group); returns self."""
        if not is_distributed():
            return self
        keys_per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(keys_per_rank, sorted(self.state_dict()))
        keys = sorted(set().union(*keys_per_rank))  # keys seen by any rank (resolutions differ)
        sd = self.state_dict()
        shapes = [sd[k].shape if k in sd else None for k in keys]
        shape_list: list = [None] * dist.get_world_size()
        dist.all_gather_object(shape_list, [None if s is None else tuple(s) for s in shapes])
        full = [next(s[i] for s in shape_list if s[i] is not None) for i in range(len(keys))]
        device = torch.device("cuda", torch.cuda.current_device()) if (
            dist.get_backend() == "nccl") else torch.device("cpu")
        flat = torch.cat([
            (sd[k].double() if k in sd else torch.zeros(s, dtype=torch.float64)).reshape(-1)
            for k, s in zip(keys, full)
        ]).to(device)
        dist.all_reduce(flat)
        out, i = {}, 0
        for k, s in zip(keys, full):
            n = math.prod(s)
            out[k] = flat[i:i + n].reshape(s).cpu()
            i += n
        self.load_state_dict(out)
        return self

    # -- update
    @torch.no_grad()
    def update(
        self, x_hat: torch.Tensor, x: torch.Tensor, *, frame_mask: torch.Tensor | None = None,
        code_hist: torch.Tensor | None = None, num_tokens: int | None = None,
        bits_per_token: float | None = None,
    ) -> None:
        """Add a batch. frame_mask (B, T): score only real frames of zero-padded clips.
        code_hist (G, K): this batch's code counts (`code_histogram` or the quantizer's
        `CodeUsage.histogram`). num_tokens: latent positions of the batch (B·prod(latent
        spatial)); bits_per_token: the quantizer's bits per position; both needed for the
        compression ratio = 24 bits × pixels / (num_tokens × bits_per_token)."""
        c = self.config
        check_pair(x_hat, x)
        if c.clamp:
            x_hat = x_hat.clamp(c.data_min, c.data_min + c.data_range)
        video = x.dim() == 5
        groups = ["all"]
        if c.breakdown:
            groups.append(f"{x.shape[-2]}x{x.shape[-1]}")
            if video:
                groups.append(f"t{x.shape[2]}")
        if video and frame_mask is not None:
            if frame_mask.shape != (x.shape[0], x.shape[2]):
                raise ValueError(f"frame_mask must be (B, T) = {(x.shape[0], x.shape[2])}")
            keep = frame_mask.reshape(-1).to(x.device).bool()
        else:
            keep = torch.ones(frames(x).shape[0], dtype=torch.bool, device=x.device)
        fa, fb = frames(x_hat)[keep], frames(x)[keep]  # (N, C, H, W) valid frames
        n = fa.shape[0]
        sums: dict[str, float] = {"samples": x.shape[0], "frames": n}
        if n:
            p = psnr(fa, fb, c.data_range, c.psnr_cap_db)
            sums["psnr"] = p.double().sum().item()
            sums["mse"] = (fa.float() - fb.float()).square().mean(dim=(1, 2, 3)).double().sum().item()
            if fb.shape[1] == 3:
                sums.update(chroma_sums(fa, fb))
            if c.ssim and min(fa.shape[-2:]) >= SSIM_MIN_SIZE:
                sums["ssim"], sums["ssim_frames"] = self._ssim_sum(fa, fb).item(), n
            if self.perceptual is not None:  # LPIPS takes [-1, 1]
                to_pm1 = lambda v: (v.float() - c.data_min) / c.data_range * 2 - 1  # noqa: E731
                lp = self.perceptual.per_frame(to_pm1(fa), to_pm1(fb), chunk=c.chunk)
                sums["lpips"], sums["lpips_frames"] = lp.double().sum().item(), n
        for g in groups:
            for k, v in sums.items():
                self._add(f"{g}/{k}", v)
        if c.references and n:
            self._add_references(x, keep, fb)
        if code_hist is not None:
            self._add("codes", code_hist.double())
        if num_tokens is not None and bits_per_token is not None:
            self._add("tokens", num_tokens)
            self._add("token_bits", num_tokens * float(bits_per_token))
            self._add("pixels", n * x.shape[-1] * x.shape[-2])  # real pixels, not padding
        if self.fid is not None and n:
            for a, b in zip(fa.split(c.chunk), fb.split(c.chunk)):
                self.fid.update(self._to_uint8(b), real=True)
                self.fid.update(self._to_uint8(a), real=False)

    def _add_references(self, x: torch.Tensor, keep: torch.Tensor, fb: torch.Tensor) -> None:
        """PSNR/SSIM sums of the trivial references (`vqcore.references`) on the scored frames."""
        c = self.config
        if x.dim() == 5:
            mask = keep.reshape(x.shape[0], x.shape[2])
            means = frames(references.mean_colour(x.float(), mask))[keep]
        else:
            means = references.mean_colour(x.float().unsqueeze(2)).squeeze(2)
        refs = {"mean_colour": means}
        for f in references.usable_factors(*fb.shape[-2:]):
            refs[f"bicubic_x{f}"] = references.bicubic(fb, f)
        lo, span = c.data_min, c.data_range
        for name, r in refs.items():
            r = r.clamp(lo, lo + span)
            self._add(f"ref.{name}.psnr", psnr(r, fb, span, c.psnr_cap_db).double().sum())
            self._add(f"ref.{name}.frames", fb.shape[0])
            if c.ssim and min(fb.shape[-2:]) >= SSIM_MIN_SIZE:
                self._add(f"ref.{name}.ssim", self._ssim_sum(r, fb))

    def _ssim_sum(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        """Σ SSIM over frames (N, C, H, W), `chunk` frames per call (bounds memory)."""
        c = self.config
        return torch.cat([ssim(a, b, c.data_min, c.data_range, c.ssim_crop)
                          for a, b in zip(fa.split(c.chunk), fb.split(c.chunk))]).double().sum()

    def _references(self, out: dict) -> None:
        """`reference_<name>_{psnr,ssim}` (every reference), and for a known compression
        ratio r the bicubic that keeps no more values (`rate_*`, ratio f² >= r: the one
        to beat) and the next richer one (`richer_*`), with `beats_rate` (1 or 0)."""
        s = self._state
        names = sorted({k.split(".")[1] for k in s if k.startswith("ref.")})
        for name in names:
            frames_n = s[f"ref.{name}.frames"]
            for metric in ("psnr", "ssim"):
                total = s.get(f"ref.{name}.{metric}")
                if total is not None:
                    out[f"reference_{name}_{metric}"] = (total / frames_n).item()
        ratio = out.get("compression_ratio")
        if ratio is None:
            return
        at, richer = references.rate_factors(ratio)
        for label, f in (("rate", at), ("richer", richer)):
            if f is not None and f"reference_bicubic_x{f}_psnr" in out:
                out[f"reference_{label}_factor"] = float(f)
                out[f"reference_{label}_psnr"] = out[f"reference_bicubic_x{f}_psnr"]
        if "reference_rate_psnr" in out and out.get("psnr") is not None:
            out["beats_rate"] = float(out["psnr"] >= out["reference_rate_psnr"])

    def _to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        x01 = ((x.float() - c.data_min) / c.data_range).clamp(0, 1)
        return (x01 * 255).round().to(torch.uint8).to(self.fid.device)

    # -- results
    def compute(self) -> dict[str, float | None]:
        """Set-level metrics; `None` where unavailable (reason in `self.unavailable`).
        Keys: psnr, mse, ssim, lpips, chroma_mse, chroma_kept (RGB; `chroma_sums`) (+ "/<H>x<W>",
        "/t<T>" breakdowns), frames, samples,
        rfid, codebook_usage, codebook_perplexity, codebook_entropy_bits, bits_per_token,
        compression_ratio."""
        s, out = self._state, {}
        groups = sorted({k.split("/", 1)[0] for k in s if "/" in k}, key=lambda g: g != "all")
        for g in groups:
            suffix = "" if g == "all" else f"/{g}"
            n = s.get(f"{g}/frames", torch.zeros(())).item()
            for name, count in (("psnr", "frames"), ("mse", "frames"), ("ssim", "ssim_frames"),
                                ("lpips", "lpips_frames"), ("chroma_mse", "frames")):
                total, cnt = s.get(f"{g}/{name}"), s.get(f"{g}/{count}")
                out[name + suffix] = None if total is None or not cnt else (total / cnt).item()
            power, power_in = s.get(f"{g}/chroma_power"), s.get(f"{g}/chroma_power_in")
            if power is not None and power_in > 0:
                out["chroma_kept" + suffix] = (power / power_in).item()
            out["frames" + suffix] = n
            out["samples" + suffix] = s.get(f"{g}/samples", torch.zeros(())).item()
        out["rfid"] = None
        if self.fid is not None:
            if min(self.fid.real_features_num_samples, self.fid.fake_features_num_samples) >= 2:
                out["rfid"] = self.fid.compute().item()
        if "codes" in s:
            out.update({f"codebook_{k}": v for k, v in code_stats(s["codes"]).items()})
        if s.get("tokens") is not None and s["tokens"] > 0:
            out["bits_per_token"] = (s["token_bits"] / s["tokens"]).item()
            out["compression_ratio"] = (24 * s["pixels"] / s["token_bits"]).item()
            out["bits_per_pixel"] = (s["token_bits"] / s["pixels"]).item()  # of RGB8's 24
        self._references(out)
        return out
