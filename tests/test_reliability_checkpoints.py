"""Checkpoint faults, each injected for real on CPU (issues 9 and 21): a writer killed
mid-write, corrupted, partial or deleted checkpoint folders (`--local` and under Ray), and a
checkpoint planted to run code on resume. docs/RELIABILITY.md lists what survives each."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_runs import ROOT, debug_config, overrides, registered, rows

from pipelines.cli import main as cli_main
from pipelines.store import checkpoint as ckpt
from pipelines.training.launch import fit

KILL_IN_SAVE = """
import os, signal, sys, torch
real_save = torch.save
def save(obj, f, *a, **k):
    if str(f).endswith("step_00000002/ema.pt"):  # half a file, then a real SIGKILL
        real_save(obj, f, *a, **k)
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = save
from pipelines.config import load_config
from pipelines.training.launch import fit
fit(load_config("jobs/debug.yaml", sys.argv[1:]), local=True)
"""


@pytest.mark.slow
def test_writer_killed_mid_checkpoint_leaves_the_previous_one_and_resumes(shards, tmp_path):
    """A training process SIGKILLed half way through writing the step-2 checkpoint: the
    step-1 checkpoint is still the newest loadable one, and the run resumes from it."""
    over = overrides(shards, tmp_path, "crash", "train.steps=2", "train.ckpt_every=1",
                     "loss.gan_weight=0", "train.log_every=1")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *over], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = tmp_path / "crash"
    found = ckpt.latest(run_dir)
    assert found is not None and found.name == "step_00000001"
    assert ckpt.check_loadable(found)["state"].step == 1

    fit(debug_config(shards, tmp_path, "crash", "train.steps=2", "train.ckpt_every=1",
                     "loss.gan_weight=0", "train.log_every=1"), local=True)  # fmt: skip
    assert ckpt.latest(run_dir).name == "step_00000002"
    assert [r["step"] for r in rows(run_dir) if "train/total" in r["metrics"]] == [1, 2]


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A local run with checkpoints at steps 2 and 4 (never modified: tests copy it)."""
    storage = tmp_path_factory.mktemp("trained")
    cfg = debug_config(shards, storage, "run", "train.steps=4", "train.ckpt_every=2",
                       "loss.gan_weight=0")  # fmt: skip
    fit(cfg, local=True)
    return cfg.run.run_dir


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_a_byte(f: Path) -> None:  # same size: only the checksum can tell
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _garbage_same_size(f: Path) -> None:
    f.write_bytes(b"x" * f.stat().st_size)


CORRUPTIONS = {
    "truncated ema": ("ema.pt", _truncate),
    "garbage train state": ("train_state.json", _garbage_same_size),
    "missing deepspeed shard": ("gen/zero_pp_rank_0_mp_rank_00_optim_states.pt", Path.unlink),
    "truncated deepspeed model states": ("gen/mp_rank_00_model_states.pt", _truncate),
    "flipped byte in model states": ("gen/mp_rank_00_model_states.pt", _flip_a_byte),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_is_an_error_naming_the_file(trained, tmp_path, case):
    name, corrupt = CORRUPTIONS[case]
    folder = shutil.copytree(trained / "step_00000004", tmp_path / "step_00000004")
    ckpt.check_loadable(folder)  # sound before
    corrupt(folder / name)
    with pytest.raises(ckpt.CheckpointError, match=name.replace(".", r"\.")):
        ckpt.check_loadable(folder)


@pytest.mark.slow
def test_partial_folders_are_passed_over(trained, tmp_path, capsys):
    """What a writer killed mid-copy leaves (Ray copies each rank's files into step_N one by
    one): no marker, a rank's manifest missing, a file cut short. `latest` passes over
    each, naming the reason, and returns the previous complete checkpoint."""
    run = shutil.copytree(trained, tmp_path / "run")
    for n, damage in enumerate(
        [
            lambda f: (f / ckpt.COMPLETE).unlink(),
            lambda f: (f / ckpt.COMPLETE).write_text('{"world_size": 2}\n'),  # rank 1 missing
            lambda f: _truncate(f / "gen" / "mp_rank_00_model_states.pt"),
        ]
    ):
        folder = shutil.copytree(run / "step_00000004", run / f"step_0000000{5 + n}")
        damage(folder)
    assert ckpt.latest(run).name == "step_00000004"
    err = capsys.readouterr().err
    assert all(f"passing over step_0000000{5 + n}" in err for n in range(3)), err
    assert "rank 1 of 2" in err and "mp_rank_00_model_states.pt" in err


@pytest.mark.slow
def test_engine_load_error_names_the_file(trained, shards, tmp_path):
    """A DeepSpeed file truncated and its manifest rewritten to match (the checks pass): the
    resume fails with a CheckpointError naming that file, not a partial load."""
    run = shutil.copytree(trained, tmp_path / "run")
    shutil.rmtree(run / "step_00000002")
    folder = run / "step_00000004"
    _truncate(folder / "gen" / "mp_rank_00_model_states.pt")
    ckpt.write_manifest(folder, 0)
    cfg = debug_config(shards, tmp_path, "run", "train.steps=6", "train.ckpt_every=2",
                       "loss.gan_weight=0")  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match=r"mp_rank_00_model_states\.pt"):
        fit(cfg, local=True)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_resumes_from_the_one_before_local(trained, shards, tmp_path,
                                                                     capsys):  # fmt: skip
    """A bit flipped in the newest checkpoint (same size: only the checksum tells): --local
    passes over it with one line, sets it aside, and resumes from the one before."""
    run = shutil.copytree(trained, tmp_path / "run")
    _flip_a_byte(run / "step_00000004" / "gen" / "mp_rank_00_model_states.pt")
    cfg = debug_config(shards, tmp_path, "run", "train.steps=6", "train.ckpt_every=2",
                       "loss.gan_weight=0", "train.log_every=1")  # fmt: skip
    fit(cfg, local=True)
    err = capsys.readouterr().err
    assert "passing over step_00000004" in err and "corrupted" in err, err
    assert "resuming from" in err and "step_00000002" in err
    assert (run / "corrupt-step_00000004").is_dir()  # kept for a look, never loaded
    assert ckpt.latest(run).name == "step_00000006"
    steps = [r["step"] for r in rows(run) if "train/total" in r["metrics"]]
    assert steps[-4:] == [3, 4, 5, 6], steps  # steps 3-4 trained again from step 2


@pytest.mark.ray
@pytest.mark.slow
def test_bad_or_deleted_newest_checkpoint_resumes_under_ray(shards, tmp_path, ray_local, capsys):
    """Issue 21 item 3, with 2 Ray workers: the newest checkpoint truncated, then deleted;
    the driver checks what Ray registered, brings Ray's record in line, and driver and
    workers resume from the newest sound one. A run of 2 workers resumed with --local, and a
    --local run resumed under Ray, fail at once saying why."""
    from pipelines.config import ConfigError

    def config(steps, *extra):
        return debug_config(shards, tmp_path, "run", f"train.steps={steps}",
                            "train.ckpt_every=2", "loss.gan_weight=0", "train.log_every=1",
                            "scaling.max_failures=0", *extra)  # fmt: skip

    run = config(4).run.run_dir
    fit(config(4))
    _truncate(run / "step_00000004" / "ema.pt")
    capsys.readouterr()
    fit(config(6))
    err = capsys.readouterr().err
    assert "passing over step_00000004" in err and "ema.pt" in err, err
    assert "resuming from" in err and "step_00000002" in err
    assert registered(run) == "step_00000006" and (run / "corrupt-step_00000004").is_dir()
    assert ckpt.check_loadable(run / "step_00000004")["state"].step == 4  # written again

    shutil.rmtree(run / "step_00000006")  # deleted: Ray alone would refuse to start
    fit(config(8))
    assert "step_00000004" in capsys.readouterr().err
    assert registered(run) == "step_00000008"
    steps = [r["step"] for r in rows(run) if "train/total" in r["metrics"]]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6, 5, 6, 7, 8], steps

    with pytest.raises(ckpt.CheckpointError, match=r"written by 2 worker\(s\) and this run has 1"):
        fit(config(10), local=True)
    local = debug_config(shards, tmp_path, "local", "train.steps=2", "train.ckpt_every=2",
                         "loss.gan_weight=0")  # fmt: skip
    fit(local, local=True)
    with pytest.raises(ConfigError, match="Ray has no record of"):
        fit(debug_config(shards, tmp_path, "local", "train.steps=4", "loss.gan_weight=0"))


class _Planted:
    """A pickle that runs a shell command when unpickled (issue 21, item 2)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(run: Path, marker: Path, legacy: bool) -> None:
    """Replace the newest checkpoint's DeepSpeed model states by the planted pickle, as an
    attacker would: manifests rewritten to match, or the legacy 'ok' marker."""
    for old in sorted(run.glob("step_*"))[:-1]:
        shutil.rmtree(old)
    folder = sorted(run.glob("step_*"))[-1]
    torch.save({"module": _Planted(marker)}, folder / "gen" / "mp_rank_00_model_states.pt")
    if legacy:
        shutil.rmtree(folder / ckpt.MANIFESTS)
        (folder / ckpt.COMPLETE).write_text("ok\n")
    else:
        ckpt.write_manifest(folder, 0)


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["manifests rewritten", "legacy ok"])
def test_planted_pickle_in_a_checkpoint_runs_nothing(trained, shards, tmp_path, legacy, capsys):
    """`vqtok train --local` resuming a planted checkpoint: one line, exit 1, nothing runs."""
    run = shutil.copytree(trained, tmp_path / "run")
    marker = tmp_path / "PWNED"
    _plant(run, marker, legacy)
    if legacy:  # never loaded: passed over, so the run starts afresh (nothing to resume)
        assert ckpt.latest(run) is None
        return
    argv = ["train", str(ROOT / "jobs/debug.yaml"), "--local",
            *overrides(shards, tmp_path, "run", "train.steps=6", "train.ckpt_every=2",
                       "loss.gan_weight=0")]  # fmt: skip
    capsys.readouterr()
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("vqtok train: ")]
    assert len(said) == 1 and "Traceback" not in err, err
    assert re.search(r"refusing to load .*mp_rank_00_model_states\.pt", said[0]), said
    assert not marker.exists()


@pytest.mark.ray
@pytest.mark.slow
def test_planted_pickle_runs_nothing_under_ray(shards, tmp_path, ray_local, capsys):
    """Ray Train restores the checkpoint it registered: planted there, it is refused on the
    workers and nothing runs; `vqtok train` says so in one line (the error comes back inside
    Ray's WorkerGroupError)."""
    first = debug_config(shards, tmp_path, "run", "train.steps=2", "train.ckpt_every=2",
                         "loss.gan_weight=0")  # fmt: skip
    fit(first, local=False)
    marker = tmp_path / "PWNED"
    _plant(first.run.run_dir, marker, legacy=False)
    argv = ["train", str(ROOT / "jobs/debug.yaml"),
            *overrides(shards, tmp_path, "run", "train.steps=4", "train.ckpt_every=2",
                       "loss.gan_weight=0", "scaling.max_failures=0")]  # fmt: skip
    capsys.readouterr()
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("vqtok train: ")]
    assert len(said) == 1 and "Traceback" not in err, err  # beside it: "[vqtok] ... resuming"
    assert re.search(r"refusing to load .*mp_rank_00_model_states\.pt", said[0]), said
    assert not marker.exists()


def test_deepspeed_states_load_weights_only(debug_objective, tmp_path):
    """Every file a ZeRO-2 engine pair writes loads through `load_states` (the allow-list is
    enough), and the engines load their own checkpoint back through it."""
    obj = debug_objective("loss.disc_start=0")
    obj.micro_step(torch.rand(1, 3, 4, 16, 16) * 2 - 1, step=1)
    obj.save(tmp_path)
    files = sorted(tmp_path.rglob("*.pt"))
    assert len(files) >= 4
    for f in files:
        ckpt.load_states(f)
    obj.load(tmp_path)
