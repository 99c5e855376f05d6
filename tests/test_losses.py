"""Losses: known values, VQGAN's adaptive weight by hand, LeCam, teacher, LPIPS weight loading.

No test here claims a perceptual number: the only LPIPS backbone on this machine is a randomly
initialised torchvision AlexNet saved by the test itself, to exercise the local-file path.
"""

import math
import warnings

import pytest
import torch
import torchvision
from torch import nn

import vqcore.losses.recon as recon_mod
from vqcore.losses import (
    BACKBONE_FILES,
    LeCam,
    Perceptual,
    PerceptualConfig,
    TeacherAlignment,
    TeacherConfig,
    TokenizerLoss,
    TokenizerLossConfig,
    adaptive_weight,
    d_hinge,
    d_non_saturating,
    g_hinge,
    g_non_saturating,
    reconstruction_loss,
)
from vqcore.models.discriminator import Discriminator3DConfig, PatchDiscriminator2DConfig


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty torch hub cache, and a fresh one-warning-per-process record."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(recon_mod, "_WARNED", set())
    return tmp_path


@pytest.fixture
def fake_alexnet(no_weights):
    """A *random* AlexNet trunk saved where torchvision would cache the real one (code path
    only: the numbers it gives are not LPIPS)."""
    ckpt = no_weights / "torch_home" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    state = {
        k: v
        for k, v in torchvision.models.alexnet().state_dict().items()
        if k.startswith("features.")
    }
    torch.save(state, ckpt / BACKBONE_FILES["alex"])
    return state


# --- reconstruction and GAN losses: known values ----------------------------------------------


def test_reconstruction_known_values_and_mask():
    x = torch.zeros(1, 1, 2, 2, 2)
    x_hat = torch.zeros_like(x)
    x_hat[:, :, 0] = 2.0  # frame 0 off by 2 everywhere, frame 1 exact
    assert reconstruction_loss(x_hat, x, "l1").item() == pytest.approx(1.0)
    assert reconstruction_loss(x_hat, x, "l2").item() == pytest.approx(2.0)
    only_exact = torch.tensor([[False, True]])
    assert reconstruction_loss(x_hat, x, "l1", frame_mask=only_exact).item() == 0.0
    only_bad = torch.tensor([[True, False]])
    assert reconstruction_loss(x_hat, x, "l2", frame_mask=only_bad).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="differ"):
        reconstruction_loss(x_hat, x[:, :, :1])
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        reconstruction_loss(x_hat, x, "huber")


def test_gan_losses_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: mean(relu(1 - r)) + mean(relu(1 + f)) = mean(0, .5) + mean(0, 1.5)
    assert d_hinge(real, fake).item() == pytest.approx(0.25 + 0.75)
    assert g_hinge(fake).item() == pytest.approx(0.75)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus
    assert d_non_saturating(real, fake).item() == pytest.approx(
        (sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.5)) / 2, rel=1e-6
    )
    assert g_non_saturating(fake).item() == pytest.approx((sp(2.0) + sp(-0.5)) / 2, rel=1e-6)
    # a perfect hinge discriminator pays nothing
    assert d_hinge(torch.full((3,), 1.5), torch.full((3,), -1.5)).item() == 0.0


def test_adaptive_weight_matches_hand_computation():
    """Tiny linear decoder y = W z + b; L_rec = mean|y - x|; D(y) = y·v, L_G = -mean D(y).
    dL_rec/dW = sign(y - x) zᵀ / (B·2); dL_G/dW = -v (Σ_b z_b)ᵀ / B (VQGAN eq. 7)."""
    torch.manual_seed(0)
    dec = nn.Linear(3, 2)
    z, x, v = torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0.7, -1.3])
    y = dec(z)
    nll = (y - x).abs().mean()
    g = -(y @ v).mean()
    lam = adaptive_weight(nll, g, dec.weight, delta=1e-4, max_weight=1e4)
    with torch.no_grad():
        grad_rec = torch.sign(y - x).T @ z / y.numel()
        grad_g = -v[:, None] * z.sum(0)[None, :] / z.shape[0]
        expected = grad_rec.norm() / (grad_g.norm() + 1e-4)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not lam.requires_grad
    clamped = adaptive_weight(nll, g * 1e-9, dec.weight, delta=0.0, max_weight=10.0)
    assert clamped.item() == 10.0


def test_lecam_zero_at_emas_and_ema_update():
    lc = LeCam(decay=0.9)
    lc.update(torch.tensor([1.0, 3.0]), torch.tensor([-2.0]))  # first batch initialises
    assert lc.ema_real.item() == 2.0 and lc.ema_fake.item() == -2.0
    # R_LC = E‖D(x) − α_F‖² + E‖D(x̂) − α_R‖² (Tseng et al. eq. 3)
    assert lc(torch.full((4,), -2.0), torch.full((4,), 2.0)).item() == 0.0
    assert lc(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(4.0 + 4.0)
    lc.update(torch.tensor([12.0]), torch.tensor([-2.0]))
    assert lc.ema_real.item() == pytest.approx(0.9 * 2.0 + 0.1 * 12.0)
    # outputs that never move: EMAs equal them, and the term vanishes when real == fake
    flat = LeCam()
    for _ in range(3):
        flat.update(torch.full((2,), 0.5), torch.full((2,), 0.5))
    assert flat(torch.full((2,), 0.5), torch.full((2,), 0.5)).item() == 0.0


def test_lecam_update_reads_nothing_back():
    """No host sync in a step: on fake tensors, reading a value back (`bool`, `item`) raises."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        lc = LeCam()
        for _ in range(2):
            lc.update(torch.randn(4), torch.randn(4))
            lc(torch.randn(4), torch.randn(4))


# --- teacher alignment ------------------------------------------------------------------------


class PatchTeacher(nn.Module):
    """A frozen 'image encoder': 4×4 patchify conv, (N, 3, H, W) -> (N, 5, H/4, W/4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 4, stride=4)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_teacher_zero_when_student_equals_teacher(distance):
    torch.manual_seed(0)
    teacher = PatchTeacher()
    align = TeacherAlignment(TeacherConfig(distance=distance), teacher)
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert align(teacher(img), img).item() == pytest.approx(0.0, abs=1e-6)
        clip = torch.randn(2, 3, 4, 16, 16)
        per_frame = torch.stack([teacher(clip[:, :, t]) for t in range(4)], dim=2)
        assert align(per_frame, clip).item() == pytest.approx(0.0, abs=1e-6)
        # latent with T/2 frames: the teacher's frames are averaged in pairs
        pooled = per_frame.reshape(2, 5, 2, 2, 4, 4).mean(3)
        assert align(pooled, clip).item() == pytest.approx(0.0, abs=1e-6)
        sub = TeacherAlignment(TeacherConfig(distance=distance, max_frames=2), teacher)
        assert sub(pooled, clip).item() == pytest.approx(0.0, abs=1e-6)
        assert align(torch.randn_like(pooled), clip).item() > 0.01


def test_teacher_projection_trains_and_checks_dims():
    torch.manual_seed(0)
    align = TeacherAlignment(
        TeacherConfig(projection=True, student_dim=7, teacher_dim=5), PatchTeacher()
    )
    student = torch.randn(2, 7, 2, 4, 4, requires_grad=True)
    loss = align(student, torch.randn(2, 3, 4, 16, 16))
    loss.backward()
    assert student.grad.abs().sum() > 0 and align.proj.weight.grad is not None
    assert all(p.grad is None for p in align.teacher.parameters())
    plain = TeacherAlignment(TeacherConfig(), PatchTeacher())
    with pytest.raises(ValueError, match="projection"):
        plain(torch.randn(2, 7, 4, 4), torch.randn(2, 3, 16, 16))


def test_teacher_contrastive_is_info_nce_by_hand():
    """Two positions, one channel pair each: logits cos/τ; loss = mean CE to the diagonal."""
    align = TeacherAlignment(TeacherConfig(distance="contrastive", temperature=0.5),
                             nn.Identity())  # fmt: skip
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).t().reshape(1, 2, 1, 2)  # (1, C, h, w)
    image = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).t().reshape(1, 2, 1, 2)  # "teacher" = x
    c = 2**-0.5  # cos of (0, 1) and (1, 1)
    logits = torch.tensor([[1.0, c], [0.0, c]]) / 0.5
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(align(student, image), expected)
    # position i must find teacher i: matched features score lower than shuffled ones
    f = torch.randn(2, 4, 3, 3)
    assert align(f, f) < align(f, f.flip(-1))


# --- LPIPS: weights from a local file, or off with one warning --------------------------------


def test_perceptual_without_weights_is_off_with_one_warning(no_weights):
    with pytest.warns(UserWarning, match="LPIPS is OFF"):
        p = Perceptual(PerceptualConfig(net="alex"))
    assert not p.available
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert p(x, -x).item() == 0.0  # off: contributes nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second build must not warn again
        loss = TokenizerLoss(TokenizerLossConfig(perceptual_weight=1.0))
    out = loss.generator(x, -x, None, step=0)
    assert "perceptual" not in out.terms  # never logged as a number
    with pytest.raises(FileNotFoundError):
        Perceptual(PerceptualConfig(backbone_path=str(no_weights / "missing.pth")))


def test_perceptual_loads_local_backbone_file(fake_alexnet, no_weights, tmp_path):
    """Code path only: the backbone is random, so no value is checked or reported."""
    p = Perceptual(PerceptualConfig(net="alex", max_frames=2))
    assert p.available and p.backbone_file.endswith(BACKBONE_FILES["alex"])
    loaded = p.lpips.net.state_dict()
    assert torch.equal(loaded["slice1.0.weight"], fake_alexnet["features.0.weight"])
    assert torch.equal(loaded["slice5.10.bias"], fake_alexnet["features.10.bias"])
    assert all(not q.requires_grad for q in p.parameters())
    clip = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    a, b = p.select_frames(clip, clip, torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool(), 2)
    assert a.shape == (3, 3, 32, 32)  # ≤ 2 valid frames of clip 0, the 1 valid frame of clip 1
    x_hat = clip.clone().requires_grad_(True)
    val = p(x_hat, clip + 0.1)
    val.backward()
    assert val.dim() == 0 and x_hat.grad is not None
    # an explicit path works too, and a file without the trunk keys fails loudly
    explicit = Perceptual(
        PerceptualConfig(
            backbone_path=str(
                no_weights / "torch_home" / "hub" / "checkpoints" / BACKBONE_FILES["alex"]
            )
        )
    )
    assert explicit.available
    torch.save({"classifier.1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="features.0.weight"):
        Perceptual(PerceptualConfig(backbone_path=str(tmp_path / "bad.pth")))


# --- the combined loss ------------------------------------------------------------------------


def _setup(video=True):
    torch.manual_seed(0)
    dec = nn.Conv3d(4, 3, 1) if video else nn.Conv2d(4, 3, 1)
    shape = (2, 4, 3, 16, 16) if video else (2, 4, 16, 16)
    z = torch.randn(*shape)
    x = torch.rand(2, 3, *shape[2:]) * 2 - 1
    return dec, z, x


def test_tokenizer_loss_terms_and_gradients(no_weights):
    dec, z, x = _setup()
    disc = Discriminator3DConfig.debug().build()
    cfg = TokenizerLossConfig(perceptual_weight=0.0, lecam_weight=0.1, disc_start=0)
    loss = TokenizerLoss(cfg)
    x_hat = dec(z)
    g = loss.generator(x_hat, x, torch.tensor(0.3), step=5, disc=disc, last_layer=dec.weight)
    assert set(g.terms) == {
        "recon_l1",
        "quantizer",
        "g_gan",
        "adaptive_weight",
        "disc_factor",
        "total",
    }
    expect = g.terms["recon_l1"] + 0.3 + 0.1 * g.terms["adaptive_weight"] * g.terms["g_gan"]
    assert g.terms["total"].item() == pytest.approx(expect.item(), rel=1e-5)
    g.total.backward()
    assert dec.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())  # G step leaves D's grads alone
    assert all(p.requires_grad for p in disc.parameters())  # ...and restores its flags
    d = loss.discriminator(x_hat.detach(), x, step=5, disc=disc)
    assert {"d_gan", "lecam", "logits_real", "logits_fake", "d_total"} <= set(d.terms)
    d.total.backward()
    assert all(p.grad is not None for p in disc.parameters())


def test_disc_start_and_2d_disc_on_video(no_weights):
    dec, z, x = _setup()
    disc2d = PatchDiscriminator2DConfig.debug().build()
    loss = TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0, disc_start=10))
    g = loss.generator(dec(z), x, None, step=9, disc=disc2d, last_layer=dec.weight)
    assert "g_gan" not in g.terms and g.terms["disc_factor"].item() == 0.0
    assert loss.discriminator(dec(z), x, step=9, disc=disc2d).total.item() == 0.0
    g = loss.generator(dec(z), x, None, step=10, disc=disc2d, last_layer=dec.weight)
    assert g.terms["disc_factor"].item() == 1.0 and "g_gan" in g.terms  # frames folded into B
    d = loss.discriminator(dec(z), x, step=10, disc=disc2d)
    assert d.total.requires_grad


def test_teacher_term_in_total(no_weights):
    dec, z, x = _setup(video=False)
    teacher = PatchTeacher()
    cfg = TokenizerLossConfig(
        perceptual_weight=0.0,
        gan_weight=0.0,
        teacher_weight=0.5,
        teacher=TeacherConfig(projection=True, student_dim=4, teacher_dim=5),
    )
    loss = TokenizerLoss(cfg, teacher=teacher)
    assert len(loss.trainable_parameters()) == 2  # the projection's weight and bias
    feats = torch.nn.functional.avg_pool2d(z, 4)
    g = loss.generator(dec(z), x, None, step=0, student_features=feats)
    assert g.terms["total"].item() == pytest.approx(
        (g.terms["recon_l1"] + 0.5 * g.terms["teacher"]).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="student_features"):
        loss.generator(dec(z), x, None, step=0)
    with pytest.raises(ValueError, match="teacher module"):
        TokenizerLoss(cfg)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"recon": "l3"},
        {"gan": "wgan"},
        {"gan_weight": -1.0},
        {"disc_start": -1},
        {"perceptual": PerceptualConfig(net="squeeze")},
    ],
)
def test_bad_loss_configs(kwargs):
    with pytest.raises(ValueError):
        TokenizerLossConfig(**kwargs).validate()
