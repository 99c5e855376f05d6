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


def test_recon_grid_shows_no_padded_frame_and_is_readable():
    """Grids: input above recon, ≥ 512 px wide, a clip's padded frames hatched, not shown."""
    import numpy as np

    from pipelines.inference.evaluate import recon_grid

    x = torch.rand(2, 3, 4, 32, 32) * 2 - 1
    x[1, :, 1:] = -1.0  # sample 1 is an image: one real frame, three of padding
    grid = recon_grid(x, x.clone(), torch.tensor([4, 1]))
    assert grid.dtype == np.uint8 and grid.shape[1] >= 512
    scale = 4  # 4 frames × 32 px -> ×4 = 512 px, + the label margins
    top, left = grid.shape[0] - 4 * 32 * scale, grid.shape[1] - 4 * 32 * scale
    body = grid[top:, left:]
    cell = lambda r, j: body[r * 32 * scale : (r + 1) * 32 * scale,  # noqa: E731
                             j * 32 * scale : (j + 1) * 32 * scale]  # fmt: skip
    expected = ((x[0, :, 2].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    np.testing.assert_array_equal(cell(0, 2)[::scale, ::scale], expected)  # input, t = 2
    for r in (2, 3):  # sample 1's rows: frame 0 shown, frames 1-3 hatched (2 greys only)
        assert len(np.unique(cell(r, 0))) > 2
        for j in (1, 2, 3):
            assert set(np.unique(cell(r, j))) == {96, 160}


def test_recon_grid_puts_images_side_by_side():
    """Single frames: one column a sample (input above, recon below), one screen high."""
    import numpy as np

    from pipelines.inference.evaluate import recon_grid

    x = torch.rand(6, 3, 32, 32) * 2 - 1
    x_hat = -x
    grid = recon_grid(x, x_hat, max_items=4)
    scale = 4  # 4 samples × 32 px -> ×4 = 512 px, + the label margins
    assert grid.shape[0] - 2 * 32 * scale < 32 and grid.shape[1] >= 512
    top, left = grid.shape[0] - 2 * 32 * scale, grid.shape[1] - 4 * 32 * scale
    body = grid[top:, left:]
    for i in range(4):
        for row, src in enumerate((x, x_hat)):
            cell = body[row * 32 * scale : (row + 1) * 32 * scale,
                        i * 32 * scale : (i + 1) * 32 * scale]  # fmt: skip
            expected = ((src[i].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            np.testing.assert_array_equal(cell[::scale, ::scale], expected)
