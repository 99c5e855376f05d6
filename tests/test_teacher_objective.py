"""Teacher alignment in the trainer (seed 004 sec. 3.4): a frozen tokenizer's encoder loaded
from a vqtok model folder, the student's latents (the quantizer's input) aligned to it; the
term is logged and changes the encoder's gradient."""

import pytest
import torch

from pipelines.store.models import export_model, load_model
from vqcore.models import build_model

TEACHER = {"type": "image_tokenizer", "flavour": "vqvae_debug"}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("teacher") / "model"
    return export_model(build_model(TEACHER), TEACHER, out)


def _encoder_grads(obj, x):
    """The encoder's gradients of one generator loss (autograd.grad: no optimiser step, and
    nothing for DeepSpeed's gradient hooks to reduce)."""
    from pipelines.training.objectives import quantizer_input

    with quantizer_input(obj.model, obj.loss_fn) as z:
        x_hat, q = obj.model(x)
    g = obj.loss_fn.generator(x_hat, x, q.loss, step=0, student_features=z.get("z"))
    params = list(obj.model.encoder.parameters())
    return g.terms, torch.autograd.grad(g.total, params, allow_unused=True)


@pytest.mark.parametrize("distance", ["contrastive", "cosine"])
def test_teacher_term_is_logged_and_moves_the_encoder(debug_objective, teacher_dir, distance):
    off = debug_objective("loss.gan_weight=0")
    on = debug_objective("loss.gan_weight=0", "loss.teacher_weight=1.0",
                         f"loss.teacher.model={teacher_dir}", f"loss.teacher.distance={distance}")  # fmt: skip
    t = on.loss_fn.teacher
    saved = load_model(teacher_dir).model.state_dict()  # the folder's model, frozen
    assert all(torch.equal(v, saved[k].to(v.device))
               for k, v in t.teacher.tokenizer.state_dict().items())  # fmt: skip
    assert all(not p.requires_grad for p in t.teacher.parameters())
    tc = on.cfg.loss.teacher  # widths read from the two models; equal here: no projection
    assert (tc.student_dim, tc.teacher_dim, t.proj) == (16, 16, None)
    on.model.load_state_dict(off.model.state_dict())
    x = torch.rand(2, 3, 4, 32, 32) * 2 - 1
    terms_off, g_off = _encoder_grads(off, x)
    terms_on, g_on = _encoder_grads(on, x)
    assert "teacher" not in terms_off and float(terms_on["teacher"]) > 0
    assert any(a is not None and not torch.allclose(a, b) for a, b in zip(g_off, g_on))
    # the training step logs it
    terms, _ = on.micro_step(x, step=0)
    assert "teacher" in terms and torch.isfinite(terms["teacher"])


def test_teacher_weight_without_a_model_names_the_setting(debug_objective):
    with pytest.raises(ValueError, match="loss.teacher.model"):
        debug_objective("loss.teacher_weight=1.0")
