"""Data and the gloo worker for tests/test_metrics.py, in a light module: spawned ranks import
only this (not scikit-image, torchvision or torchmetrics' FID)."""

import os

import pytest
import torch
import torch.distributed as dist

from vqcore.metrics import MetricsConfig, ReconMetrics, code_histogram


def cfg(ssim: bool = True) -> MetricsConfig:
    return MetricsConfig(lpips=None, fid=False, ssim=ssim)


def batches() -> list[dict]:
    """Mixed images and (masked) clips at three resolutions, with code counts."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, shape in enumerate([(2, 3, 16, 16), (3, 3, 12, 20), (2, 3, 4, 16, 16),
                               (1, 3, 2, 12, 12), (2, 3, 16, 16)]):
        x = torch.rand(*shape, generator=g) * 2 - 1
        x_hat = x + 0.2 * torch.randn(*shape, generator=g)  # some outside [-1, 1]: clamped
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool() if shape[2] == 4 else None
        codes = torch.randint(0, 16, (shape[0], 4, 4), generator=g)
        out.append(dict(x_hat=x_hat, x=x, frame_mask=mask, code_hist=code_histogram(codes, 16),
                        num_tokens=codes.numel(), bits_per_token=4.0 + i % 2))
    return out


def same(got: dict, ref: dict, rel: float = 1e-12) -> None:
    """Equal keys, equal None-ness (unavailable metrics), numbers equal to `rel`."""
    assert set(got) == set(ref)
    assert {k for k, v in got.items() if v is None} == {k for k, v in ref.items() if v is None}
    nums = {k: v for k, v in ref.items() if v is not None}
    assert {k: got[k] for k in nums} == pytest.approx(nums, rel=rel)


def dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = ReconMetrics(cfg(ssim=False))  # SSIM would import torchmetrics in every rank
        for i, kw in enumerate(batches()):
            if i % world == rank:  # ranks see different resolutions, so different keys
                m.update(**kw)
        torch.save(m.all_reduce().compute(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
