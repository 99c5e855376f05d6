"""The trainer's EMA of the generator: warmed-up decay, so short runs never evaluate the init."""

import torch
from torch import nn

from pipelines.training.loop import warmup_ema


def test_warmup_ema_follows_the_tensorflow_schedule_and_drops_the_init():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = warmup_ema(model, decay=0.99)
    expected = model.weight.detach().clone()
    for n in range(1, 121):  # 120 optimiser steps, the weight moves to n each time
        with torch.no_grad():
            model.weight.fill_(float(n))
        d = 0.0 if n == 1 else min(0.99, n / (9 + n))  # first update copies; then n_averaged
        expected = d * expected + (1 - d) * model.weight.detach()
        ema.update_parameters(model)
    torch.testing.assert_close(ema.module.weight, expected)
    # the random start's share is the product of the decays: about 0.2 % (plain 0.99: 30 %)
    init_share = torch.tensor([min(0.99, n / (9 + n)) for n in range(2, 121)]).prod()
    assert init_share < 0.003
    assert ema.n_averaged.device.type == "cpu" and int(ema.n_averaged) == 120


def test_warmup_ema_copies_integer_buffers():
    model = nn.BatchNorm1d(2)
    ema = warmup_ema(model, decay=0.999)
    for _ in range(3):
        model.num_batches_tracked += 5
        ema.update_parameters(model)
    assert int(ema.module.num_batches_tracked) == 15
