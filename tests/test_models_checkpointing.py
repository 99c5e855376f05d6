"""Activation checkpointing of the conv tokenizers (`checkpoint_res_blocks`, what
`train.activation_checkpointing` applies): same outputs and gradients, less memory.

Memory is measured by `benchmarks/train_memory.py` (fake tensors under torch's MemTracker),
the same estimator BENCHMARKS.md reports for the full-size model."""

import os

import pytest
import torch
import torch.nn.functional as F

from vqcore.models import build_model
from vqcore.models.blocks import checkpoint_res_blocks

SPECS = {
    "pvqvae": ({"type": "pvqvae", "flavour": "debug"}, (2, 3, 4, 16, 16)),
    "image": ({"type": "image_tokenizer", "flavour": "vqvae_debug"}, (2, 3, 16, 16)),
}


def _grads(spec, shape, grad_checkpoint, dropout=0.0):
    torch.manual_seed(0)
    model = build_model({**spec, "dropout": dropout})
    if grad_checkpoint:
        assert checkpoint_res_blocks(model) > 4
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(2)  # dropout masks
    x_hat, q = model(x)
    (F.mse_loss(x_hat, x) + q.loss).backward()
    # the wrapper adds a level to the names (its state_dict hooks take it out again)
    named = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in model.named_parameters()}
    assert set(named) <= set(model.state_dict())  # checkpoints keep the plain names
    return x_hat.detach(), {n: p.grad for n, p in named.items() if p.grad is not None}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_keeps_outputs_and_gradients(name, dropout):
    spec, shape = SPECS[name]
    out0, g0 = _grads(spec, shape, False, dropout)
    out1, g1 = _grads(spec, shape, True, dropout)
    assert torch.equal(out0, out1)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:  # recomputation replays the same kernels (and dropout's RNG state)
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


def test_checkpointing_is_off_in_eval_and_no_grad():
    spec, shape = SPECS["pvqvae"]
    model = build_model(spec).eval()
    checkpoint_res_blocks(model)
    with torch.no_grad():
        x_hat, _ = model(torch.zeros(shape))
    assert x_hat.shape == shape and not x_hat.requires_grad


def test_memory_estimate_shows_checkpointing_saves_activations(monkeypatch):
    from benchmarks.train_memory import estimate
    from benchmarks.train_step import parse, parser

    monkeypatch.setenv("VQCORE_CHECK_FINITE", "0")  # as train_memory.py's main sets it
    before = dict(os.environ)
    args = parse(parser("t"), ["--models", "pvqvae:debug", "--frames", "8", "--size", "64x64",
                               "--no-disc"])  # fmt: skip
    peaks = {}
    for on in (False, True):
        args.grad_checkpoint = on
        est = estimate("pvqvae:debug", "bf16", args)
        assert est["shape"] == [1, 3, 8, 64, 64]
        b = est["bytes"]
        # weights, gradients and Adam's two moments are all there (fp32, 4 B a parameter)
        assert b["parameter"] >= 4 * est["params_g"] and b["optstate"] >= 8 * est["params_g"]
        peaks[on] = b
    assert dict(os.environ) == before  # nothing leaks into later tests
    # measured 23.1 vs 38.8 MiB (60 %); at full size 10.6 vs 27.4 GiB (BENCHMARKS.md)
    assert peaks[True]["activation"] < 0.7 * peaks[False]["activation"]
    assert peaks[True]["total"] < peaks[False]["total"]
