"""Building blocks of the tokenizers (vqcore.models.blocks)."""

import pytest
import torch

from vqcore.models.blocks import ChannelNorm


def _reference(x, weight, bias, eps):
    """LayerNorm over dim 1, written out in float64."""
    xd = x.double()
    var, mean = torch.var_mean(xd, dim=1, keepdim=True, correction=0)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (xd - mean) / torch.sqrt(var + eps) * weight.double().view(shape) + bias.double().view(
        shape
    )


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (2, 6, 3, 5, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_norm_is_layer_norm_over_channels(shape, channels_last):
    """Values and gradients of the fused layer_norm path equal the formula, whatever the
    memory format; the output keeps the input's shape."""
    torch.manual_seed(0)
    norm = ChannelNorm(shape[1])
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(shape) * 3 + 1
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_()
    y = norm(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    want = _reference(x, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn(shape, dtype=torch.float64)
    (y.double() * g).sum().backward()
    got = [x.grad, norm.weight.grad, norm.bias.grad]
    xd = x.detach().double().requires_grad_()
    wd = norm.weight.detach().double().requires_grad_()
    bd = norm.bias.detach().double().requires_grad_()
    (_reference(xd, wd, bd, norm.eps) * g).sum().backward()
    for a, b in zip(got, [xd.grad, wd.grad, bd.grad]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_channel_norm_bf16_keeps_dtype_and_fp32_statistics():
    """bf16 input (as under autocast): bf16 output within bf16 rounding of the exact norm
    of that input, autocast on or off."""
    torch.manual_seed(0)
    norm = ChannelNorm(32)
    x = (torch.randn(2, 32, 4, 6, 6) * 10 + 50).bfloat16()  # a large mean: fp32 stats matter
    want = _reference(x, norm.weight, norm.bias, norm.eps)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = norm(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), want, rtol=2**-7, atol=2**-7)
