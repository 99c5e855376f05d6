"""vqcore.spectral: DWT against pywavelets, perfect reconstruction, FFT features."""

import numpy as np
import pytest
import pywt
import torch

from vqcore.spectral import dwt, fft_features, idwt, ifft_features, wavedec, waverec

WAVELETS = ["haar", "db2", "bior2.2", "sym4"]


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_dwt_matches_pywt_periodization(wavelet):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 8, 16, dtype=torch.float64)
    ref = pywt.dwtn(x.numpy(), wavelet, mode="periodization", axes=(-3, -2, -1))
    c = dwt(x, (-3, -2, -1), wavelet)
    assert c.shape == (2, 8, 3, 2, 4, 8)
    for key, band in ref.items():  # key "dad": detail along T, approx along H, detail along W
        idx = sum((ch == "d") << j for j, ch in enumerate(key))
        np.testing.assert_allclose(c[:, idx].numpy(), band, atol=1e-10)


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize(
    "level_axes",
    [
        [(-2, -1)] * 3,  # per-frame 2D, 3 levels
        [(-3, -2, -1)] * 2,  # 3D, 2 levels
        [(-2, -1), (-3, -2, -1), (-3, -2, -1)],  # the PVQ-VAE schedule: space first, then both
    ],
)
def test_multilevel_inverse_reconstructs_to_1e5(wavelet, level_axes):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 16, 24) * 2 - 1
    levels = wavedec(x, level_axes, wavelet)
    assert len(levels) == len(level_axes)
    assert (waverec(levels, level_axes, wavelet) - x).abs().max() < 1e-5


def test_dwt_image_and_gradient():
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    c = dwt(x, (-2, -1), "db2")
    assert c.shape == (2, 4, 3, 8, 8)
    assert torch.allclose(idwt(c, (-2, -1), "db2"), x, atol=1e-5)
    c[:, 3].sum().backward()  # the diagonal detail band
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dwt_bad_input():
    with pytest.raises(ValueError, match="even"):
        dwt(torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match="axes"):
        dwt(torch.randn(1, 3, 8, 8), axes=(-3, -1))
    with pytest.raises(ValueError, match="wavelet"):
        dwt(torch.randn(1, 3, 8, 8), wavelet="nope")


def test_fft_features_round_trip_and_modes():
    x = torch.randn(2, 3, 5, 8, 6)
    f = fft_features(x, ndim=3)
    assert f.shape == (2, 6, 5, 8, 4)
    assert torch.allclose(ifft_features(f, (5, 8, 6)), x, atol=1e-5)
    amp_phase = fft_features(x, ndim=2, mode="amp_phase")
    assert amp_phase.shape == (2, 9, 5, 8, 4)
    # cos² + sin² = 1 of the phase channels
    cos, sin = amp_phase[:, 3:6], amp_phase[:, 6:]
    assert torch.allclose(cos**2 + sin**2, torch.ones_like(cos), atol=1e-4)
    with pytest.raises(ValueError, match="mode"):
        fft_features(x, 2, mode="bogus")
