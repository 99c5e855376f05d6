"""What one training step optimises, as the model describes itself
(`vqcore.models.config.TokenizerConfig`), over DeepSpeed engines.

- `TokenizerObjective` (image tokenizers, PVQ-VAE): generator engine (model + any trainable
  loss parts) on recon + quantizer + perceptual + GAN (+ teacher); a discriminator engine
  when the GAN term is on (`loss.gan_weight > 0`), stepped from `loss.disc_start`.
- `PartwiseObjective` (models with `step_parts`): each part in turn on the same batch, one
  engine per part so Adam's moments of a frozen part never move it. HFSVQ (seed 000,
  Algorithm 1): F_L on its VQ-VAE loss, then F_H on the residual of the updated, frozen F_L.

An objective owns its engines: `micro_step`, `save`/`load` of their state, `lr`.

A non-finite loss or non-finite latents (on any rank: the check is all-reduced) skip the step
on every rank and leave every weight as it was: no backward, no optimiser step, and the state
a forward changes in place (EMA codebooks, CVQ re-anchored codes, usage counters, LeCam
statistics) is put back from a copy taken before the forward (`StateGuard`; quantizer
parameters and all buffers: small next to the model). Latents are checked on the device, not
read back (`LatentCheck`): non-finite ones reach the quantizer as zeros, so every family runs
(FSQ would index out of range on NaN) and with it the collectives the other ranks are in, and
the step's one finiteness check reads their flag with the loss: one host sync for the
generator step, one for the discriminator's, and no graph break in a compiled forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipelines.config import Config
from pipelines.data.inputs import autocast, fold_frames
from pipelines.inference.evaluate import top_level_quantizers
from pipelines.training.parallel import make_engine, use_bf16


def _all_finite(t: torch.Tensor, *flags: torch.Tensor) -> bool:
    """True on every rank only if `t` is finite and every bool `flags` holds, on every rank
    (all skip together). One all-reduce and one read back: the step's host sync."""
    ok = torch.isfinite(t.detach()).all()
    for flag in flags:
        ok = ok & flag
    ok = ok.float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


class LatentCheck:
    """Finiteness of every top-level quantizer's input in training, kept on the device.

    A forward pre-hook ANDs `isfinite(z).all()` into `ok` and hands the quantizer z, or zeros
    if z is not finite (so the quantizer and its collectives run as on every other rank, and no
    NaN reaches a codebook: the step is skipped and its state restored anyway). The quantizer's
    own input test (a host sync) is turned off. `reset()` before each forward; `ok` then goes
    into the step's one check (`_all_finite`)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        for q in top_level_quantizers(model):
            q.register_forward_pre_hook(self._hook)
            q.check_finite = False

    def reset(self) -> None:
        self.ok.fill_(True)

    def _hook(self, module: nn.Module, args: tuple):
        if not (module.training and args and isinstance(args[0], torch.Tensor)):
            return None
        z = args[0]
        finite = torch.isfinite(z).all()
        self.ok.logical_and_(finite)
        return (torch.where(finite, z, torch.zeros_like(z)), *args[1:])


class StateGuard:
    """A copy of what a forward may change in place: every buffer of `modules` and the
    parameters of their quantizers (codebooks). `save()` before the forward, `restore()`
    when the step is skipped. The copies are allocated once and refilled."""

    def __init__(self, *modules: nn.Module | None):
        tensors: dict[int, torch.Tensor] = {}
        for m in modules:
            if m is None:
                continue
            for b in m.buffers():
                tensors[id(b)] = b
            for q in top_level_quantizers(m):
                for p in q.parameters():
                    if p.numel() and not hasattr(p, "ds_id"):  # skip ZeRO-3 partitions
                        tensors[id(p)] = p
        self.pairs = [(t, torch.empty_like(t)) for t in tensors.values()]

    @torch.no_grad()
    def save(self) -> None:
        for t, copy in self.pairs:
            copy.copy_(t)

    @torch.no_grad()
    def restore(self) -> None:
        for t, copy in self.pairs:
            t.copy_(copy)


class Objective:
    model: nn.Module
    engines: dict

    def __init__(self, cfg: Config, device: torch.device):
        from vqcore.models import build_model

        self.cfg, self.device = cfg, device
        self.model = build_model(cfg.model).to(device)
        self.video = self.model.config.takes_clips  # image models see frames as images
        if cfg.train.activation_checkpointing:
            from vqcore.models.blocks import checkpoint_res_blocks

            checkpoint_res_blocks(self.model)
        self.micro = 0
        self.tokens = 0  # latent positions quantized on this rank
        # second halves skipped for a non-finite loss (the discriminator's step; HFSVQ's F_H)
        self.nonfinite_disc = 0
        self._guards: dict[str, StateGuard] = {}

    def guard(self, name: str, *modules: nn.Module | None) -> StateGuard:
        if name not in self._guards:
            self._guards[name] = StateGuard(*modules)
        return self._guards[name]

    def init_engines(self) -> None:
        """Wrap the model in its DeepSpeed engines. Called after anything that must copy the
        full model (the EMA): under ZeRO-3 the engines partition its parameters. The EMA copy
        is made before the latent check and `train.compile` too, so evaluation has neither."""
        self.latents = LatentCheck(self.model, self.device)
        if self.cfg.train.compile:  # after the EMA copy: it must not share the compiled call
            for module in (self.model, getattr(self, "disc", None)):
                if module is not None:
                    module.compile(backend=self.cfg.train.compile_backend)
        self.engines = self._engines()

    def _engines(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, x: torch.Tensor, num_frames: torch.Tensor | None) -> torch.Tensor:
        """The frames a step trains on: the batch cut to its shortest clip's real frames, so
        no loss term (recon, perceptual, quantizer, GAN) sees zero padding; image models see
        each frame as an image. Images come in batches of their own (`data.decode_group`):
        only a clip shorter than T costs the batch's other clips their later frames."""
        if num_frames is not None and len(num_frames):
            x = x[:, :, : max(1, int(num_frames.min()))]
        return x if self.video else fold_frames(x)

    # -- engine state
    def save(self, directory: Path) -> None:
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(directory), tag=name)

    def load(self, directory: Path) -> None:
        from pipelines.store.checkpoint import CheckpointError

        for name, engine in self.engines.items():
            try:
                path, _ = engine.load_checkpoint(str(directory), tag=name)
            except Exception as exc:  # DeepSpeed raises assorted types on corrupt files
                bad = _first_unreadable(directory / name)
                raise CheckpointError(
                    f"cannot load engine '{name}' from {bad or directory / name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if path is None:
                raise CheckpointError(f"no engine state '{name}' in {directory}")

    def lr(self) -> float:
        engine = next(iter(self.engines.values()))
        return float(engine.lr_scheduler.get_last_lr()[0])

    def boundary(self) -> bool:
        """True when this micro-step completes an optimiser step (gradient accumulation)."""
        self.micro += 1
        return self.micro % self.cfg.optim.grad_accum == 0

    def quantizer_metrics(self) -> dict[str, float]:
        """Usage and perplexity of each quantizer since the last call (then reset)."""
        out = {}
        quantizers = top_level_quantizers(self.model)
        for i, q in enumerate(quantizers):
            name = "codebook" if len(quantizers) == 1 else f"codebook{i}"
            out.update({f"train/{name}_{k}": v for k, v in q.usage_stats().items()})
            q.reset_usage()
        return out

    def count_tokens(self, z_q) -> None:
        """Latent positions quantized on this rank (for tokens/s)."""
        z = z_q[0] if isinstance(z_q, tuple) else z_q
        self.tokens += z.numel() // z.shape[1]


class TokenizerObjective(Objective):
    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        from vqcore.losses import TokenizerLoss

        teacher = load_teacher(cfg, self.model) if cfg.loss.teacher_weight > 0 else None
        self.loss_fn = TokenizerLoss(cfg.loss, teacher=teacher).to(device)
        self.disc = None
        if cfg.loss.gan_weight > 0:
            from vqcore.models.discriminator import build_discriminator

            self.disc = build_discriminator(cfg.disc).to(device)

    def _engines(self) -> dict:
        cfg, micro = self.cfg, self.cfg.data.batch_size
        gen_params = list(self.model.parameters()) + self.loss_fn.trainable_parameters()
        engines = {"gen": make_engine(self.model, gen_params, cfg, cfg.optim.lr, micro)}
        if self.disc is not None:
            lr = cfg.optim.disc_lr or cfg.optim.lr
            engines["disc"] = make_engine(self.disc, self.disc.parameters(), cfg, lr, micro)
        return engines

    def micro_step(self, x, step: int, num_frames=None):
        x = self.prepare(x, num_frames)
        gen = self.engines["gen"]
        guard = self.guard("gen", self.model, self.loss_fn, self.disc)
        guard.save()
        self.latents.reset()
        with autocast(self.device, use_bf16(self.cfg, self.device)), quantizer_input(self.model, self.loss_fn) as z:
            x_hat, q = self.model(x)
        x_hat = x_hat.float()
        self.count_tokens(q.z_q)
        last = getattr(self.model, "last_layer", None)
        if self.cfg.train.zero_stage == 3:
            last = None  # sharded weight: adaptive GAN weight falls back to 1 (see loss config)
        g = self.loss_fn.generator(x_hat, x, q.loss, step, disc=self.disc, last_layer=last,
                                   student_features=z.get("z"))  # fmt: skip
        terms = dict(g.terms)
        terms.update({f"quantizer/{k}": v for k, v in q.metrics.items()})
        if not _all_finite(g.total, self.latents.ok):
            guard.restore()
            return None, False
        gen.backward(g.total)
        gen.step()
        if self.disc is not None and self.loss_fn.disc_active(step):
            d_guard = self.guard("disc", self.loss_fn, self.disc)
            d_guard.save()
            d = self.loss_fn.discriminator(x_hat.detach(), x, step, self.disc)
            if _all_finite(d.total):
                self.engines["disc"].backward(d.total)
                self.engines["disc"].step()
                terms.update(d.terms)
            else:  # the generator step stands; D keeps its weights
                d_guard.restore()
                self.nonfinite_disc += 1
        return terms, self.boundary()


class PartwiseObjective(Objective):
    """A model whose step updates its parts in turn (`TokenizerConfig.step_parts`), each with
    its own engine and loss. HFSVQ (its Algorithm 1): each iteration updates F_L on the
    batch, then F_H on the residual of the updated, frozen F_L, on the same batch."""

    def _engines(self) -> dict:
        cfg, micro, m = self.cfg, self.cfg.data.batch_size, self.model
        return {part: make_engine(getattr(m, part), m.part_parameters(part), cfg, cfg.optim.lr, micro)
                for part in m.config.step_parts}  # fmt: skip

    def micro_step(self, x, step: int, num_frames=None):
        """A non-finite loss of the first part skips the whole step; of a later part, that
        part only (the earlier updates stand, as a generator step stands when the
        discriminator's is skipped)."""
        x = self.prepare(x, num_frames)
        terms: dict[str, torch.Tensor] = {}
        for i, part in enumerate(self.model.config.step_parts):
            module = getattr(self.model, part)
            guard = self.guard(part, module)
            guard.save()
            self.latents.reset()
            with autocast(self.device, use_bf16(self.cfg, self.device)):
                out = self.model.part_loss(part, x)
            loss = out.loss.float()
            if not _all_finite(loss, self.latents.ok):
                guard.restore()
                if i == 0:
                    return None, False
                self.nonfinite_disc += 1
                break
            self.count_tokens(out.quantized.z_q)
            engine = self.engines[part]
            engine.backward(loss)
            engine.step()
            terms.update({k: v.float() for k, v in out.metrics.items()})
            terms[f"{part}/total"] = loss.detach()
        return terms, self.boundary()


@contextlib.contextmanager
def quantizer_input(model: nn.Module, loss_fn) -> Iterator[dict]:
    """{"z": the latents the model's quantizer was given} after the block, when the loss
    aligns them with a teacher (the student features of seed 004 sec. 3.4); else {}."""
    got: dict = {}
    if loss_fn.teacher is None:
        yield got
        return
    handle = model.quantizer.register_forward_pre_hook(lambda _m, args: got.update(z=args[0]))
    try:
        yield got
    finally:
        handle.remove()


def load_teacher(cfg: Config, student: nn.Module) -> nn.Module:
    """The frozen teacher of `loss.teacher.model` (any `load_model` spec: a vqtok run folder,
    exported model, checkpoint or MLflow URI): its tokenizer's encoder (`EncoderTeacher`).
    Sets `loss.teacher`'s dims, and a projection when the student's latent width differs."""
    from pipelines.store.models import load_model
    from vqcore.losses import EncoderTeacher

    tc = cfg.loss.teacher
    if not tc.model:
        raise ValueError("loss.teacher_weight > 0 needs loss.teacher.model: a vqtok model "
                         "(run folder, exported model, checkpoint or runs:/ URI)")  # fmt: skip
    teacher = EncoderTeacher(load_model(tc.model).model).eval().requires_grad_(False)
    with torch.no_grad():
        tc.teacher_dim = int(teacher(torch.zeros(1, 3, 32, 32)).shape[1])
    tc.student_dim = int(student.quantizer.config.dim)
    tc.projection = tc.projection or tc.student_dim != tc.teacher_dim
    return teacher


def _first_unreadable(folder: Path) -> Path | None:
    """The first file of an engine's folder that is missing or not a sound torch archive
    (a zip: `testzip` checks every member's CRC without unpickling anything)."""
    import zipfile

    if not folder.is_dir():
        return folder
    for f in sorted(folder.glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                if z.testzip() is not None:
                    return f
        except (OSError, zipfile.BadZipFile):
            return f
    return None


def build_objective(cfg: Config, device: torch.device) -> Objective:
    partwise = bool(cfg.model.step_parts)
    return (PartwiseObjective if partwise else TokenizerObjective)(cfg, device)
