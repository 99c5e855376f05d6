"""Padding is not data: no training loss term sees the zero-padded frames of a batch, and a
model pads time by repeating the last frame, so an image alone and an image in a clip agree."""

import torch

from vqcore.models.pvqvae import PVQVAEConfig


def _weights(obj) -> list[torch.Tensor]:
    return [p.detach().clone() for m in (obj.model, obj.disc) for p in m.parameters()]


def _step(debug_objective, x, num_frames):
    obj = debug_objective("loss.disc_start=0", "loss.adaptive_weight=false")
    torch.manual_seed(1)
    terms, _ = obj.micro_step(x, step=3, num_frames=num_frames)
    assert terms is not None and "d_total" in terms  # G and D both stepped
    return _weights(obj)


def test_no_loss_term_sees_padded_frames(debug_objective):
    """Two batches equal in their real frames and different in the padding train to the same
    weights (generator and discriminator); a change in a real frame does not."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 32, 32, generator=g) * 2 - 1
    num_frames = torch.tensor([4, 2], dtype=torch.int32)
    x[1, :, 2:] = -1.0  # the data path's zero padding (uint8 0)
    other_padding = x.clone()
    other_padding[1, :, 2:] = torch.rand(3, 2, 32, 32, generator=g)
    other_real = x.clone()
    other_real[1, :, 1] = torch.rand(3, 32, 32, generator=g)

    base = _step(debug_objective, x, num_frames)
    for a, b in zip(base, _step(debug_objective, other_padding, num_frames)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b)
               for a, b in zip(base, _step(debug_objective, other_real, num_frames)))  # fmt: skip


def test_pvqvae_pads_time_with_the_last_frame():
    torch.manual_seed(0)
    model = PVQVAEConfig.from_dict({"flavour": "debug"}).build().eval()
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    still = image.unsqueeze(2).expand(-1, -1, 2, -1, -1)  # the temporal factor is 2
    with torch.no_grad():
        torch.testing.assert_close(model.encode(image), model.encode(still))
        x_hat, _ = model(image)
    assert x_hat.shape == image.shape
