"""Two real gloo processes on CPU: after a training step on different data per rank, the
usage counters, EMA statistics and re-anchored codebooks are identical on both ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqcore.quantizers import build, names

CASES = [{"type": n, "dim": 8} for n in names()] + [
    {"type": "vq", "dim": 8, "codebook_size": 16, "update": "ema", "cvq": True},
    {"type": "vq", "dim": 8, "codebook_size": 16, "cvq": True, "cvq_anchor": "random"},
    # quantize-dropout draws how many levels run; every rank must run the same ones
    {"type": "rvq", "dim": 8, "quantize_dropout": 1.0},
]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for i, spec in enumerate(CASES):
            torch.manual_seed(0)  # same initial weights on every rank
            q = build(spec).train()
            torch.manual_seed(100 + rank)  # different data (and random anchors) per rank
            for _ in range(2):
                q(torch.randn(2, 8, 4, 4))
            torch.save(q.state_dict(), os.path.join(out_dir, f"case{i}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_state_identical_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for i, spec in enumerate(CASES):
        s0 = torch.load(tmp_path / f"case{i}_rank0.pt", weights_only=True)
        s1 = torch.load(tmp_path / f"case{i}_rank1.pt", weights_only=True)
        counted = [k for k in s0 if k.endswith("counts")]
        assert counted, f"{spec}: no usage counters in the state"
        for k in counted:
            assert s0[k].sum() > 0
        for k in s0:
            if k.endswith(("counts", "ema_size", "ema_sum", "usage_ema", "anchor_shift")) or (
                spec.get("cvq") and k.endswith("weight")
            ):
                assert torch.equal(s0[k], s1[k]), f"{spec}: {k} differs between ranks"
