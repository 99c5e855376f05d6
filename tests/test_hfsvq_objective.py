"""HFSVQ in the trainer follows its seed's Algorithm 1 (seed 000 supp.): each iteration updates
F_L on the batch, then F_H on the residual of the updated F_L, on the same batch."""

import torch


def test_each_step_updates_f_low_then_f_high_on_the_same_batch(debug_objective):
    obj = debug_objective("model={type: hfsvq, flavour: debug}", "data.frame_counts=[1]",
                          "loss.gan_weight=0")  # fmt: skip
    model = obj.model
    low0 = [p.detach().clone() for p in model.low.parameters()]
    high0 = [p.detach().clone() for p in model.high.parameters()]
    seen = {}
    high_loss = model.high_loss

    def spy(x):  # what F_H's step sees: the batch and F_L's weights at that moment
        seen["x"], seen["low"] = x.clone(), [p.detach().clone() for p in model.low.parameters()]
        return high_loss(x)

    model.high_loss = spy
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    terms, stepped = obj.micro_step(x, step=0, num_frames=torch.tensor([1, 1]))
    assert stepped and {"low/total", "high/total"} <= set(terms)
    low1 = [p.detach() for p in model.low.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(low0, low1))  # F_L moved
    assert all(torch.equal(a, b) for a, b in zip(seen["low"], low1))  # F_H saw the moved F_L
    assert any(not torch.equal(a, b) for a, b in zip(high0, model.high.parameters()))
    torch.testing.assert_close(seen["x"], x[:, :, 0])  # the same batch, as images
