"""Host syncs of one training micro-step (issue 8: "no host syncs in the step"), at the
objective level (`pipelines/training/objectives.py`), in one process: the values vqtok's code reads
back, and the latent check that stays on the device inside one compiled graph. The skip of a
non-finite step itself is tested in tests/test_reliability_train.py."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _reader(frames) -> str:
    """Who read a tensor back: the innermost frame outside torch (ours, DeepSpeed's, ...)."""
    ours = (str(ROOT / "pipelines"), str(ROOT / "vqcore"))
    for f in reversed(frames):
        if "/torch/" not in f.filename:
            return "ours" if f.filename.startswith(ours) else f.filename
    return "torch"


def test_a_micro_step_reads_back_two_flags_only(debug_objective):
    """Host syncs in a step (issue 8): vqtok's own code reads back one flag for the generator
    step (its loss and the latents) and one for the discriminator's; nothing else (LeCam's
    EMAs, the quantizers' statistics, CVQ, the loss terms stay on the device). Reads are
    `aten._local_scalar_dense` calls (what `.item()` and `bool(tensor)` dispatch to)."""
    import traceback
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.by = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.by[_reader(traceback.extract_stack()[:-1])] += 1
            return func(*args, **(kwargs or {}))

    obj = debug_objective(
        "loss.gan_weight=0.1", "loss.disc_start=0", "loss.lecam_weight=0.1",
        "model.quantizer={type: vq, codebook_size: 16, update: ema, cvq: true}",
    )  # fmt: skip
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    obj.micro_step(x, 0)  # first steps: lazy state of the optimiser and LeCam
    with Reads() as reads:
        terms, _ = obj.micro_step(x, 1)
    assert terms is not None and "d_total" in terms  # both steps ran
    assert reads.by["ours"] == 2, reads.by


def test_latent_check_flags_nan_on_the_device_in_one_compiled_graph():
    """The trainer's latent check reads nothing back: compiled with fullgraph=True (no break),
    a NaN latent reaches the quantizer as zeros and only the device flag says so."""
    from pipelines.training.objectives import LatentCheck
    from vqcore.models import build_model

    torch.manual_seed(0)
    model = build_model({"type": "pvqvae", "flavour": "debug"}).train()
    check = LatentCheck(model, torch.device("cpu"))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    check.reset()
    compiled(x)
    assert check.ok.item()
    x[0, 0, 0, 0, 0] = float("nan")
    check.reset()
    x_hat, _ = compiled(x)
    assert not check.ok.item() and torch.isfinite(x_hat).all()
