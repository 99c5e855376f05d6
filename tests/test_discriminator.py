"""Discriminators: output shapes (odd sizes too), clear errors, gradients to input and weights."""

import pytest
import torch

from vqcore.models.discriminator import (
    Discriminator3D,
    Discriminator3DConfig,
    PatchDiscriminator2D,
    PatchDiscriminator2DConfig,
    build_discriminator,
)


@pytest.mark.parametrize("hw", [(12, 12), (13, 17), (31, 20), (64, 48)])
def test_patch2d_shapes(hw):
    d = PatchDiscriminator2DConfig.debug().build()
    out = d(torch.randn(2, 3, *hw))
    assert out.shape == (2, 1, d.output_size(hw[0]), d.output_size(hw[1]))
    assert d.output_size(hw[0]) == hw[0] // 4 - 2  # 2 stride-2 layers, then two 4×4 s1 convs


def test_patch2d_default_is_vqgan_sized():
    d = PatchDiscriminator2D()  # ndf 64, 3 layers: taming's NLayerDiscriminator
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert d(torch.randn(1, 3, 24, 37)).shape == (1, 1, 1, 2)


@pytest.mark.parametrize("norm", ["group", "none"])
def test_patch2d_norms(norm):
    d = PatchDiscriminator2DConfig(channels=8, num_layers=2, norm=norm).build()
    assert d(torch.randn(1, 3, 16, 16)).shape == (1, 1, 2, 2)


@pytest.mark.parametrize("thw", [(1, 4, 4), (3, 7, 9), (5, 16, 12), (8, 5, 33)])
def test_3d_shapes(thw):
    d = Discriminator3DConfig.debug().build()
    assert d(torch.randn(2, 3, *thw)).shape == (2, 1)


def test_3d_default_runs_small_clip():
    d = Discriminator3D()  # the seed's widths 64..512
    assert d(torch.randn(2, 3, 3, 8, 10)).shape == (2, 1)


@pytest.mark.parametrize(
    "make, x, match",
    [
        (PatchDiscriminator2DConfig.debug, torch.randn(2, 3, 11, 40), "too small"),
        (PatchDiscriminator2DConfig.debug, torch.randn(2, 1, 16, 16), "3 channels"),
        (PatchDiscriminator2DConfig.debug, torch.randn(2, 3, 2, 16, 16), "4-d"),
        (
            PatchDiscriminator2DConfig.debug,
            torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
            "floating",
        ),
        (Discriminator3DConfig.debug, torch.randn(2, 3, 16, 16), "5-d"),
        (Discriminator3DConfig.debug, torch.randn(2, 3, 4, 3, 16), "too small"),
        (Discriminator3DConfig.debug, torch.randn(2, 4, 4, 16, 16), "3 channels"),
    ],
)
def test_bad_inputs(make, x, match):
    d = make().build()
    with pytest.raises(ValueError, match=match):
        d(x)


@pytest.mark.parametrize(
    "cfg",
    [
        PatchDiscriminator2DConfig(num_layers=0),
        PatchDiscriminator2DConfig(norm="layer"),
        Discriminator3DConfig(channels=()),
        Discriminator3DConfig(kernel_size=4),
        Discriminator3DConfig(norm="instance"),
    ],
)
def test_bad_configs(cfg):
    with pytest.raises(ValueError):
        cfg.build()


@pytest.mark.parametrize(
    "make, shape",
    [
        (PatchDiscriminator2DConfig.debug, (2, 3, 16, 20)),
        (Discriminator3DConfig.debug, (2, 3, 3, 9, 8)),
    ],
)
def test_gradients_reach_input_and_every_weight(make, shape):
    torch.manual_seed(0)
    d = make().build().train()
    x = torch.randn(*shape, requires_grad=True)
    d(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in d.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_build_from_dict():
    d = build_discriminator({"type": "disc3d", "flavour": "debug", "channels": [4, 8]})
    assert isinstance(d, Discriminator3D) and d.config.channels == (4, 8)
    d = build_discriminator({"type": "patch2d", "flavour": "debug", "norm": "group"})
    assert isinstance(d, PatchDiscriminator2D) and d.config.channels == 8
    with pytest.raises(ValueError, match="unknown config key"):
        build_discriminator({"type": "patch2d", "width": 3})
    with pytest.raises(ValueError, match="unknown discriminator type"):
        build_discriminator({"type": "stylegan"})


def test_3d_bf16_step_copies_no_activation():
    """Under bf16 autocast the 3D discriminator's training step makes no copy of a feature
    map: pooled features stay bf16 (CPU autocast would run max_pool3d in fp32: a cast each
    way) and SiLU is not in place (autograd would clone its input). What is cast: the input
    clip and its gradient, and the last map into the embedding's fp32 mean and back."""
    from torch.utils._python_dispatch import TorchDispatchMode

    d = Discriminator3D()
    x = torch.randn(1, 3, 4, 32, 32, requires_grad=True)
    copies = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name in ("aten._to_copy", "aten.clone", "aten.copy_"):
                copies.append((name, tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16), Record():
        d(x).sum().backward()
    maps = [c for c in copies if len(c[1]) == 5 and c[1][0] == 1]  # (1, C, T, H, W) activations
    clip, last = ("aten._to_copy", (1, 3, 4, 32, 32)), ("aten._to_copy", (1, 512, 1, 4, 4))
    assert maps == [clip, last, last, clip], maps
