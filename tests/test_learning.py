"""Learning is guarded: each family's debug model, trained a few hundred CPU steps on the
demo shards with `benchmarks/learning.py`'s recipe (the trainer's core: Adam, warm-up, clipping,
L1 + the quantizer's loss, EMA, no loss on padding), must score a PSNR floor on the held-out
clips well above each clip's mean colour. A change that stops a family learning fails here.

Floors: the mean colour on the same frames plus a margin of about half the gain measured at
this budget (BENCHMARKS.md, "Learning"), so seeds and threads do not make them flaky and a
model that only learns the colour does not pass."""

from __future__ import annotations

import pytest

from benchmarks.learning import FAMILIES, VIDEO, Budget, train

pytestmark = pytest.mark.slow

BUDGET = Budget(steps=300, every=300, val_frames=4)
# dB above each clip's mean colour, at BUDGET
MARGINS = {"pvqvae": 2.0, "looc_vae": 2.0, "hrvq_vae": 2.5, "hfsvq": 2.5}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from pipelines.data.demo_data import make_demo_data

    out = tmp_path_factory.mktemp("learning")
    make_demo_data(out)
    return out


@pytest.mark.parametrize("family", list(MARGINS))
def test_family_learns_well_above_the_mean_colour(demo_data, family):
    spec = FAMILIES[family]
    result = train(spec, demo_data, BUDGET, video=spec["type"] in VIDEO)
    floor = result["reference_mean_colour_psnr"] + MARGINS[family]
    assert result["psnr"] >= floor, (family, result["curve"], result["psnr"], floor)


def test_the_conv_ae_reference_takes_a_step():
    """The plain conv autoencoder (the reference a trunk must be near) has no model config;
    its step functions once read `model.config` and crashed."""
    import torch

    from benchmarks.learning import _step_fns, build

    model = build(FAMILIES["conv_ae"])
    [(opt, loss_fn)] = _step_fns(model, 1e-3, "l2")
    before = [p.detach().clone() for p in model.parameters()]
    loss = loss_fn(torch.rand(2, 3, 2, 16, 16) * 2 - 1)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
