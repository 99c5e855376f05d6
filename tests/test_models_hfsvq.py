"""HFSVQ (seed 000): two-level model and the alternating schedule of Algorithm 1."""

import pytest
import torch
import torch.nn.functional as F
from model_data import image_crops

from vqcore.models import HFSVQConfig, build_model


def _model(**kw):
    torch.manual_seed(0)
    return build_model({"type": "hfsvq", "flavour": "debug", **kw})


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(before, module):
    after = module.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed"


def test_defaults_follow_the_seed():
    cfg = HFSVQConfig()
    assert cfg.high.quantizer["type"] == "pq"
    m = build_model({"type": "hfsvq", "flavour": "debug"})
    assert m.high.quantizer.config.num_subspaces == 4  # S = 4
    assert m.high.quantizer.config.codebook_size == 16  # K_s = 16
    assert m.low.quantizer.config.type == "vq"


@pytest.mark.parametrize("hw", [(16, 16), (20, 28)])
def test_shapes_and_tokens(hw):
    m = _model().eval()
    x = torch.rand(2, 3, *hw) * 2 - 1
    with torch.no_grad():
        x_hat, q = m(x)
    assert x_hat.shape == x.shape
    assert isinstance(q.codes, tuple) and len(q.codes) == 2
    assert any(k.startswith("low/") for k in q.metrics)
    assert any(k.startswith("high/") for k in q.metrics)
    codes = m.tokenize(x)
    assert torch.allclose(m.detokenize(codes, hw), x_hat, atol=1e-5)


def test_high_step_leaves_low_unchanged():
    """Algorithm 1, F_H step: a real optimizer step changes F_H and nothing of F_L (params,
    codebook buffers, usage counters), with F_L's codebook learned by EMA to catch updates
    made in a train-mode forward."""
    m = _model(low={"quantizer": {"update": "ema"}})
    x = image_crops(16, n=2)
    opt = torch.optim.Adam(m.high_step_parameters(), lr=1e-2)
    m.low_loss(x)  # some F_L state exists
    low_before, high_before = _state(m.low), _state(m.high)
    step = m.high_loss(x)
    opt.zero_grad()
    step.loss.backward()
    assert all(p.grad is None for p in m.low.parameters())
    opt.step()
    _assert_same(low_before, m.low)
    assert any(not torch.equal(v, m.high.state_dict()[k]) for k, v in high_before.items())
    assert step.x_hat.shape == x.shape and "high/mse" in step.metrics
    # one optimizer over everything: F_L still gets no gradient, so Adam skips it
    opt_all = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    step = m.high_loss(x)
    opt_all.zero_grad(set_to_none=True)
    step.loss.backward()
    opt_all.step()
    _assert_same(low_before, m.low)


def test_low_step_touches_only_low():
    m = _model()
    x = image_crops(16, n=2)
    high_before = _state(m.high)
    step = m.low_loss(x)
    step.loss.backward()
    assert all(p.grad is None for p in m.high.parameters())
    assert m.low.encoder.conv_in.weight.grad.abs().sum() > 0
    assert m.low.quantizer.codebook.weight.grad.abs().sum() > 0
    _assert_same(high_before, m.high)


def test_nested_config_overrides():
    m = _model(high={"quantizer": {"num_subspaces": 2}}, low={"channels": 8})
    assert m.high.quantizer.config.num_subspaces == 2
    assert m.high.config.channels == 16 and m.low.config.channels == 8
    with pytest.raises(ValueError, match=r"hfsvq\.low.*bogus"):
        _model(low={"bogus": 1})
    with pytest.raises(ValueError, match="bogus"):
        _model(bogus=1)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="ImageTokenizer: expected"):
        _model()(torch.randn(2, 4, 16, 16))


@pytest.mark.slow
def test_alternating_training_overfits_real_crops():
    """60 alternating F_L / F_H steps on four 32² photo crops: MSE of X̂_l + X̂_r falls ≥ 5×
    (measured 22×), and F_H improves on F_L alone."""
    m = _model()
    x = image_crops(32, n=4)
    opt_low = torch.optim.Adam(m.low_step_parameters(), lr=2e-3)
    opt_high = torch.optim.Adam(m.high_step_parameters(), lr=2e-3)
    with torch.no_grad():
        first = F.mse_loss(m(x)[0], x).item()
    for _ in range(60):
        for loss_fn, opt in ((m.low_loss, opt_low), (m.high_loss, opt_high)):
            step = loss_fn(x)
            opt.zero_grad(set_to_none=True)
            step.loss.backward()
            opt.step()
    m.eval()
    with torch.no_grad():
        last = F.mse_loss(m(x)[0], x).item()
        low_only = F.mse_loss(m.low(x)[0], x).item()
    assert last < first / 5, (first, last)
    assert last < low_only, (last, low_only)
