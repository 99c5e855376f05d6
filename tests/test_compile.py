"""torch.compile sees every quantizer and the PVQ-VAE networks as one graph (issue 8).

A graph break splits a compiled step into pieces that run eagerly between them, and the
usual cause in a VQ model is a host read (`.item()`, `bincount`, `nonzero`, a Python branch
on a tensor): a sync per step on a GPU. `fullgraph=True` makes Dynamo raise on any break, so
these tests fail on one. They use the "eager" backend: Dynamo's trace without Inductor's code
generation (minutes of C++ compiling on CPU; `benchmarks/train_step.py --compile on` runs it).
The fused CUDA search under compile is tested in tests/test_ops_fused.py (interpreter or GPU).
"""

import copy

import pytest
import torch

from vqcore.models import build_model
from vqcore.models.discriminator import build_discriminator
from vqcore.quantizers import build, names


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    # the quantizers' NaN check reads a flag back to the host (the trainer turns it off in
    # compiled steps and checks the loss instead); torch path for the search on every device
    monkeypatch.setenv("VQCORE_CHECK_FINITE", "0")
    monkeypatch.setenv("VQCORE_FUSED", "0")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _codes(codes):
    return list(codes) if isinstance(codes, tuple) else [codes]


def _step(q, z):
    out = q(z)
    (out.z_q.square().mean() + out.loss).backward()
    return out


@pytest.mark.parametrize("family", names())
def test_quantizer_training_step_is_one_graph(family):
    """Training forward + backward compiled with fullgraph=True: no break, and the same
    codes, loss and input gradient as eager (pq and hrvq take the gathered search)."""
    torch.manual_seed(0)
    eager = build({"type": family, "dim": 8}).train()
    compiled = build({"type": family, "dim": 8}).train()
    compiled.load_state_dict(eager.state_dict())
    z = torch.randn(2, 8, 3, 4, 5)
    z_e, z_c = z.clone().requires_grad_(), z.clone().requires_grad_()
    torch.manual_seed(1)  # gvq samples Gumbel noise: the same draws in both
    want = _step(eager, z_e)
    torch.manual_seed(1)
    got = _step(torch.compile(compiled, backend="eager", fullgraph=True), z_c)
    for a, b in zip(_codes(want.codes), _codes(got.codes), strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(z_c.grad, z_e.grad)
    # buffers the forward updates (EMA codebooks, usage counters) moved the same way
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(b, a, msg=name)


@pytest.mark.parametrize(
    "spec, shape",
    [
        ({"type": "pvqvae", "flavour": "debug"}, (1, 3, 4, 32, 32)),
        ({"type": "image_tokenizer", "flavour": "vqvae_debug"}, (1, 3, 32, 32)),
        ({"type": "hfsvq", "flavour": "debug"}, (1, 3, 32, 32)),
    ],
)
def test_tokenizer_forward_is_one_graph(spec, shape):
    """Forward + backward of the whole tokenizer compiled with fullgraph=True: the same
    reconstruction as eager, and gradients on the same parameters."""
    torch.manual_seed(0)
    eager = build_model(spec).train()
    model = copy.deepcopy(eager)
    x = torch.rand(shape) * 2 - 1
    want, q_want = eager(x)
    (want.square().mean() + q_want.loss).backward()
    got, q_got = torch.compile(model, backend="eager", fullgraph=True)(x)
    (got.square().mean() + q_got.loss).backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(q_got.loss, q_want.loss)
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, msg=name)


@pytest.mark.parametrize(
    "kind, shape", [("disc3d", (1, 3, 4, 32, 32)), ("patch2d", (1, 3, 32, 32))]
)
def test_discriminator_is_one_graph(kind, shape):
    torch.manual_seed(0)
    disc = build_discriminator({"type": kind, "flavour": "debug"})
    x = torch.randn(shape)
    want = disc(x)
    got = torch.compile(disc, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, want)
