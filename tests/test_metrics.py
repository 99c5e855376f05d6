"""Metrics: PSNR/SSIM against scikit-image on its sample images, exact merging of accumulators
(in-process and over two gloo ranks), codebook statistics, and LPIPS/rFID only with weights.

Tolerances: PSNR within 1e-4 dB and SSIM within 2e-5 of scikit-image (our side computes in
fp32; scikit-image in fp64). No test claims an LPIPS or FID number for real weights: none exist
on this machine."""

import numpy as np
import pytest
import skimage.data
import torch
import torch.multiprocessing as mp
import torchvision
from _metrics_data import batches, cfg, dist_worker, same
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

import vqcore.losses.recon as recon_mod
from vqcore.losses import BACKBONE_FILES, Perceptual, PerceptualConfig
from vqcore.metrics import (
    MetricsConfig,
    ReconMetrics,
    code_histogram,
    code_stats,
    psnr,
    ssim,
)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(recon_mod, "_WARNED", set())
    return tmp_path


def _pairs():
    """(clean, noisy) uint8 HxWx3 crops of scikit-image's bundled photos."""
    rng = np.random.default_rng(0)
    out = []
    for name, sigma in (("astronaut", 10.0), ("chelsea", 25.0), ("coffee", 5.0)):
        im = getattr(skimage.data, name)()[40:136, 60:188]  # 96×128
        noisy = np.clip(im + rng.normal(0, sigma, im.shape), 0, 255).astype(np.uint8)
        out.append((im, noisy))
    return out


def _to_pm1(im: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> (1, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(im).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_psnr_matches_skimage():
    pairs = _pairs()
    x = torch.cat([_to_pm1(a) for a, _ in pairs])
    x_hat = torch.cat([_to_pm1(b) for _, b in pairs])
    ours = psnr(x_hat, x, data_range=2.0)
    ref = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in pairs]
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)
    assert psnr(x, x).tolist() == pytest.approx([100.0] * 3)  # exact: capped, not inf


def test_ssim_matches_skimage():
    pairs = _pairs()
    x = torch.cat([_to_pm1(a) for a, _ in pairs])
    x_hat = torch.cat([_to_pm1(b) for _, b in pairs])
    ours = ssim(x_hat, x)
    # Wang et al.'s settings: Gaussian σ = 1.5, population covariances, data range of uint8
    ref = [structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False) for a, b in pairs]
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-5)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(x[..., :10, :], x[..., :10, :])


def test_video_scores_are_per_frame():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    x_hat = x + 0.1 * torch.randn_like(x) * torch.arange(1, 4).view(1, 1, 3, 1, 1)
    p, s = psnr(x_hat, x), ssim(x_hat, x)
    assert p.shape == s.shape == (2, 3)
    for t in range(3):
        torch.testing.assert_close(p[:, t], psnr(x_hat[:, :, t], x[:, :, t]))
        torch.testing.assert_close(s[:, t], ssim(x_hat[:, :, t], x[:, :, t]))
    assert (p[:, 0] > p[:, 2]).all()  # more noise in later frames


def test_code_stats_and_histogram():
    uniform = code_stats(torch.full((1, 8), 5.0))
    assert uniform == pytest.approx({"usage": 1.0, "perplexity": 8.0, "entropy_bits": 3.0})
    half = code_stats(torch.tensor([[4.0, 4.0, 0.0, 0.0]]))
    assert half == pytest.approx({"usage": 0.5, "perplexity": 2.0, "entropy_bits": 1.0})
    hist = code_histogram((torch.tensor([[0, 1], [1, 1]]), torch.tensor([3, 3])), num_codes=4)
    assert hist.tolist() == [[1, 3, 0, 0], [0, 0, 0, 2]]
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        code_histogram(torch.tensor([4]), num_codes=4)


def test_merge_equals_one_accumulator():
    data = batches()
    whole = ReconMetrics(cfg())
    a, b = ReconMetrics(cfg()), ReconMetrics(cfg())
    for i, kw in enumerate(data):
        whole.update(**kw)
        (a if i % 2 else b).update(**kw)
    ref = whole.compute()
    same(a.merge(b).compute(), ref)
    # Ray-actor style: sum the two state dicts key by key into a fresh accumulator
    c, d = ReconMetrics(cfg()), ReconMetrics(cfg())
    for i, kw in enumerate(data):
        (c if i < 2 else d).update(**kw)
    summed = c.state_dict()
    for k, v in d.state_dict().items():
        summed[k] = summed[k] + v if k in summed else v
    fresh = ReconMetrics(cfg())
    fresh.load_state_dict(summed)
    same(fresh.compute(), ref)
    # the set mean is over frames, not a mean of per-batch means
    assert ref["frames"] == 2 + 3 + 5 + 2 + 2 and ref["frames/t4"] == 5
    for key in ("psnr/16x16", "psnr/12x20", "psnr/t4", "psnr/t2", "ssim/12x12"):
        assert key in ref


def test_colour_kept_and_chroma_error():
    """A grey picture (each pixel's channel mean) keeps the luma and no colour: chroma_kept 0,
    and its MSE is all chroma; the input itself keeps it all; half the chroma keeps a quarter
    of its power. Hand-computed on scikit-image's astronaut (a colour photo)."""
    x = _to_pm1(skimage.data.astronaut()[::8, ::8])
    grey = x.mean(1, keepdim=True).expand_as(x)
    half = grey + 0.5 * (x - grey)
    chroma = x - grey
    for x_hat, kept, chroma_mse in ((x, 1.0, 0.0), (grey, 0.0, chroma.square().mean().item()),
                                    (half, 0.25, (0.5 * chroma).square().mean().item())):
        m = ReconMetrics(cfg())
        m.update(x_hat, x)
        out = m.compute()
        assert out["chroma_kept"] == pytest.approx(kept, abs=1e-6)
        assert out["chroma_mse"] == pytest.approx(chroma_mse, abs=1e-7)
        assert out["chroma_mse"] == pytest.approx(out["mse"], abs=1e-7)  # luma exact in all three
    m = ReconMetrics(cfg())
    m.update(torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16))  # one channel: no colour
    assert "chroma_kept" not in m.compute() and m.compute()["chroma_mse"] is None


def test_compression_ratio_and_masked_frames():
    m = ReconMetrics(cfg())
    x = torch.zeros(1, 3, 4, 16, 16)
    x_hat = x.clone()
    x_hat[:, :, 2:] = 1.0  # padded frames badly reconstructed: must not count
    m.update(x_hat, x, frame_mask=torch.tensor([[1, 1, 0, 0]]).bool(),
             code_hist=torch.ones(1, 4), num_tokens=1 * 1 * 4 * 4, bits_per_token=10.0)
    out = m.compute()
    assert out["psnr"] == pytest.approx(100.0) and out["frames"] == 2
    # 8 bits × 3 channels × 2·16·16 real pixels / (16 tokens × 10 bits): padding is not data
    assert out["compression_ratio"] == pytest.approx(24 * 512 / 160)
    assert out["bits_per_pixel"] == pytest.approx(160 / 512)
    assert out["bits_per_token"] == 10.0 and out["codebook_usage"] == 1.0


def test_lpips_unavailable_without_weights(no_weights):
    with pytest.warns(UserWarning, match="LPIPS is OFF"):
        m = ReconMetrics(MetricsConfig(fid=False))
    m.update(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    assert m.compute()["lpips"] is None and "lpips" in m.unavailable
    assert "rfid" in m.unavailable and m.compute()["rfid"] is None


def test_lpips_code_path_with_local_file(no_weights):
    """A random AlexNet saved as a local file: the metric is computed and accumulated; its
    value is NOT an LPIPS score and is not checked."""
    ckpt = no_weights / "torch_home" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    state = {k: v for k, v in torchvision.models.alexnet().state_dict().items()
             if k.startswith("features.")}
    torch.save(state, ckpt / BACKBONE_FILES["alex"])
    m = ReconMetrics(MetricsConfig(fid=False), perceptual=Perceptual(PerceptualConfig()))
    x = torch.rand(2, 3, 2, 32, 32) * 2 - 1
    m.update(x.flip(-1), x)
    assert "lpips" not in m.unavailable
    assert m.state_dict()["all/lpips_frames"].item() == 4


def test_rfid_unavailable_without_weights(no_weights):
    with pytest.warns(UserWarning, match="rFID unavailable"):
        m = ReconMetrics(MetricsConfig(lpips=None))
    assert m.fid is None and "Inception" in m.unavailable["rfid"]


class TinyFeatures(nn.Module):
    """Stand-in feature network for FID's bookkeeping (uint8 images -> 6 features)."""

    num_features = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3 * 4, 6)

    def forward(self, x):
        return self.proj(nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1))


def test_fid_state_merges_exactly():
    data = batches()
    mk = lambda: ReconMetrics(cfg(), fid=FrechetInceptionDistance(feature=TinyFeatures()))  # noqa: E731
    whole, a, b = mk(), mk(), mk()
    for i, kw in enumerate(data):
        whole.update(**kw)
        (a if i % 2 else b).update(**kw)
    ref = whole.compute()["rfid"]
    assert ref is not None and ref > 0
    assert a.merge(b).compute()["rfid"] == pytest.approx(ref, rel=1e-6)


def test_all_reduce_over_two_ranks(tmp_path):
    """Two gloo processes holding different resolutions (so different state keys)."""
    mp.spawn(dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    whole = ReconMetrics(cfg(ssim=False))
    for kw in batches():
        whole.update(**kw)
    ref = whole.compute()
    for rank in range(2):
        same(torch.load(tmp_path / f"rank{rank}.pt"), ref)


# --- trivial references beside the model ------------------------------------------------------


def test_references_are_scored_on_the_real_frames_beside_the_model():
    """Each clip's mean colour over its real frames, bicubic down/up at x2..x16 against PIL's
    bicubic on the same photo, and the bicubic at the model's rate named as the one to beat."""
    from PIL import Image

    from vqcore import references

    photo = skimage.data.astronaut()[::8, ::8]  # 64 x 64 x 3 uint8
    x = torch.from_numpy(photo).permute(2, 0, 1).float() / 127.5 - 1  # (3, 64, 64)
    clip = torch.stack([x, x.flip(-1), torch.zeros_like(x)], dim=1)[None]  # (1, 3, T=3, 64, 64)
    mask = torch.tensor([[True, True, False]])  # the third frame is padding
    mean = references.mean_colour(clip, mask)
    torch.testing.assert_close(mean[0, :, 0, 0, 0], x.mean(dim=(1, 2)))  # padding not averaged

    small = Image.fromarray(photo).resize((16, 16), Image.BICUBIC).resize((64, 64), Image.BICUBIC)
    pil = torch.from_numpy(np.asarray(small)).permute(2, 0, 1).float() / 127.5 - 1
    ours = references.bicubic(x[None], 4)[0].clamp(-1, 1)
    assert abs(psnr(ours[None], x[None]).item() - psnr(pil[None], x[None]).item()) < 0.5

    assert references.rate_factors(36.6) == (8, 4)  # 64x keeps fewer values; 16x more
    assert references.rate_factors(16.0) == (4, 2) and references.rate_factors(300) == (None, 16)

    m = ReconMetrics(MetricsConfig(fid=False, lpips=None))
    x_hat = clip + 0.05 * torch.randn_like(clip)
    m.update(x_hat, clip, frame_mask=mask, num_tokens=16 * 16, bits_per_token=12.0)
    out = m.compute()
    assert out["compression_ratio"] == pytest.approx(24 * 2 * 64 * 64 / (256 * 12))  # 64x
    assert out["reference_rate_factor"] == 8.0 and out["reference_richer_factor"] == 4.0
    assert out["reference_rate_psnr"] == out["reference_bicubic_x8_psnr"]
    assert out["reference_mean_colour_psnr"] < out["reference_bicubic_x8_psnr"] < out[
        "reference_bicubic_x4_psnr"] < out["reference_bicubic_x2_psnr"]  # fmt: skip
    assert out["beats_rate"] == 1.0  # 26 dB of noise beats a 8 x 8 thumbnail
    m2 = ReconMetrics(MetricsConfig(fid=False, lpips=None))
    m2.update(references.mean_colour(clip, mask), clip, frame_mask=mask, num_tokens=64,
              bits_per_token=12.0)  # fmt: skip
    assert m2.compute()["beats_rate"] == 0.0
