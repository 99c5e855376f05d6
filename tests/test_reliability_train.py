"""Training-side faults, each injected for real on CPU (issue 9): a Ray Train worker killed
mid-run, a checkpoint writer killed mid-write, corrupted checkpoint files, non-finite
losses (transient, and a diverging run). docs/RELIABILITY.md lists what survives each."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipelines.cli import main as cli_main
from pipelines.config import load_config
from pipelines.store import checkpoint as ckpt
from pipelines.training.launch import fit
from pipelines.training.loop import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


def _overrides(shards, storage, name, *extra):
    return [
        f"data.shards={json.dumps(shards['train'])}",
        f"train.eval_shards={json.dumps(shards['val'])}",
        f"run.storage={storage}",
        f"run.name={name}",
        *extra,
    ]


def _config(shards, storage, name, *extra):
    return load_config(ROOT / "jobs/debug.yaml", _overrides(shards, storage, name, *extra))


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state(folder) -> ckpt.TrainState:
    return ckpt.TrainState.from_file(folder / "train_state.json")


def _weights(folder) -> dict[str, torch.Tensor]:
    """The EMA and the DeepSpeed generator weights of a checkpoint folder."""
    ema = torch.load(folder / "ema.pt", weights_only=True)
    ds = ckpt.load_states(folder / "gen" / "mp_rank_00_model_states.pt")
    return {
        **{f"ema/{k}": v for k, v in ema.items()},
        **{f"gen/{k}": v for k, v in ds["module"].items()},
    }


def _same(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# --- worker loss ------------------------------------------------------------------------


def _train_workers() -> set[int]:
    """PIDs of the Ray Train workers this test process started (descendants only: other
    Rays on the machine are not ours to touch)."""
    import psutil

    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.add(p.pid)
        except psutil.Error:
            continue
    return found


def _registered(run_dir: Path) -> str | None:
    """The checkpoint Ray Train has registered last (what a restarted group restores)."""
    from pipelines.training.resume import RAY_SNAPSHOT

    try:
        latest = json.loads((run_dir / RAY_SNAPSHOT).read_text())["latest_checkpoint_result"]
        return latest["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _kill_a_worker_after(run_dir: Path, name: str, log: dict) -> None:
    """Wait until Ray registered checkpoint `name`, SIGKILL one Train worker, then wait for
    the new group to start (new worker PIDs)."""
    deadline = time.time() + 300
    while time.time() < deadline and _registered(run_dir) != name:
        time.sleep(0.05)
    before = _train_workers()
    if not before:
        return
    victim = max(before)
    os.kill(victim, signal.SIGKILL)
    log["killed"], log["after"] = victim, _registered(run_dir)
    while time.time() < deadline:
        new = _train_workers() - before
        if new:
            log["restarted"] = sorted(new)
            return
        time.sleep(0.1)


# what differs by nature between two runs: throughput, wall time, and the data loader's
# counters (they count since the worker process started)
NOT_IDENTICAL = ("train/clips_per_s", "train/tokens_per_s", "train/data_wait_frac", "data/")


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_with_identical_results(shards, tmp_path, ray_local):
    """SIGKILL a Ray Train worker after the step-6 checkpoint: the group restarts from it
    (FailureConfig) and finishes; with a fixed seed on CPU, the final weights (EMA and
    DeepSpeed) are bit-identical to an uninterrupted run's, and so are the final training
    and evaluation metrics."""
    steps = ["train.steps=18", "train.ckpt_every=6", "train.log_every=3", "train.eval_every=0",
             "loss.gan_weight=0", "scaling.max_failures=1", "train.seed=7"]  # fmt: skip
    clean = fit(_config(shards, tmp_path, "clean", *steps))

    cfg = _config(shards, tmp_path, "killed", *steps)
    log: dict = {}
    killer = threading.Thread(
        target=_kill_a_worker_after, args=(cfg.run.run_dir, "step_00000006", log)
    )
    killer.start()
    killed = fit(cfg)
    killer.join()
    assert log.get("after") == "step_00000006" and log.get("restarted"), log
    logged = [r["step"] for r in _rows(cfg.run.run_dir) if "train/total" in r["metrics"]]
    assert logged[:2] == [3, 6] and 3 not in logged[2:] and 6 not in logged[2:], logged

    a, b = ckpt.latest(tmp_path / "clean"), ckpt.latest(cfg.run.run_dir)
    assert a.name == b.name == "step_00000018"
    assert _same(_weights(a), _weights(b)) == []
    keys = [k for k in clean if not k.startswith(NOT_IDENTICAL)]
    assert "eval/psnr" in keys and "train/total" in keys
    assert {k: killed[k] for k in keys} == {k: clean[k] for k in keys}
    assert _state(b).epoch == _state(a).epoch and _state(b).micro_step == 18


# --- interrupted and corrupted checkpoints ---------------------------------------------


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
from pipelines.cli import main as cli_main
from pipelines.config import load_config
from pipelines.training.launch import fit
fit(load_config("jobs/debug.yaml", sys.argv[1:]), local=True)
"""


@pytest.mark.slow
def test_writer_killed_mid_checkpoint_leaves_the_previous_one_and_resumes(shards, tmp_path):
    """A training process SIGKILLed half way through writing the step-2 checkpoint: the
    step-1 checkpoint is still the newest loadable one, and the run resumes from it."""
    over = _overrides(shards, tmp_path, "crash", "train.steps=2", "train.ckpt_every=1",
                      "loss.gan_weight=0", "train.log_every=1")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *over], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = tmp_path / "crash"
    found = ckpt.latest(run_dir)
    assert found is not None and found.name == "step_00000001"
    assert ckpt.check_loadable(found)["state"].step == 1

    fit(_config(shards, tmp_path, "crash", "train.steps=2", "train.ckpt_every=1",
                "loss.gan_weight=0", "train.log_every=1"), local=True)  # fmt: skip
    assert ckpt.latest(run_dir).name == "step_00000002"
    assert [r["step"] for r in _rows(run_dir) if "train/total" in r["metrics"]] == [1, 2]


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A local run with checkpoints at steps 2 and 4 (never modified: tests copy it)."""
    storage = tmp_path_factory.mktemp("trained")
    cfg = _config(shards, storage, "run", "train.steps=4", "train.ckpt_every=2",
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
    cfg = _config(shards, tmp_path, "run", "train.steps=6", "train.ckpt_every=2",
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
    cfg = _config(shards, tmp_path, "run", "train.steps=6", "train.ckpt_every=2",
                  "loss.gan_weight=0", "train.log_every=1")  # fmt: skip
    fit(cfg, local=True)
    err = capsys.readouterr().err
    assert "passing over step_00000004" in err and "corrupted" in err, err
    assert "resuming from" in err and "step_00000002" in err
    assert (run / "corrupt-step_00000004").is_dir()  # kept for a look, never loaded
    assert ckpt.latest(run).name == "step_00000006"
    steps = [r["step"] for r in _rows(run) if "train/total" in r["metrics"]]
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
        return _config(shards, tmp_path, "run", f"train.steps={steps}", "train.ckpt_every=2",
                       "loss.gan_weight=0", "train.log_every=1", "scaling.max_failures=0",
                       *extra)  # fmt: skip

    run = config(4).run.run_dir
    fit(config(4))
    _truncate(run / "step_00000004" / "ema.pt")
    capsys.readouterr()
    fit(config(6))
    err = capsys.readouterr().err
    assert "passing over step_00000004" in err and "ema.pt" in err, err
    assert "resuming from" in err and "step_00000002" in err
    assert _registered(run) == "step_00000006" and (run / "corrupt-step_00000004").is_dir()
    assert ckpt.check_loadable(run / "step_00000004")["state"].step == 4  # written again

    shutil.rmtree(run / "step_00000006")  # deleted: Ray alone would refuse to start
    fit(config(8))
    assert "step_00000004" in capsys.readouterr().err
    assert _registered(run) == "step_00000008"
    steps = [r["step"] for r in _rows(run) if "train/total" in r["metrics"]]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6, 5, 6, 7, 8], steps

    with pytest.raises(ckpt.CheckpointError, match=r"written by 2 worker\(s\) and this run has 1"):
        fit(config(10), local=True)
    local = _config(shards, tmp_path, "local", "train.steps=2", "train.ckpt_every=2",
                    "loss.gan_weight=0")  # fmt: skip
    fit(local, local=True)
    with pytest.raises(ConfigError, match="Ray has no record of"):
        fit(_config(shards, tmp_path, "local", "train.steps=4", "loss.gan_weight=0"))


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
            *_overrides(shards, tmp_path, "run", "train.steps=6", "train.ckpt_every=2",
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
    first = _config(shards, tmp_path, "run", "train.steps=2", "train.ckpt_every=2",
                    "loss.gan_weight=0")  # fmt: skip
    fit(first, local=False)
    marker = tmp_path / "PWNED"
    _plant(first.run.run_dir, marker, legacy=False)
    argv = ["train", str(ROOT / "jobs/debug.yaml"),
            *_overrides(shards, tmp_path, "run", "train.steps=4", "train.ckpt_every=2",
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


# --- non-finite losses ------------------------------------------------------------------


def test_skipped_step_changes_no_weight(debug_objective):
    """Objective level: a NaN input gives a NaN loss; the step is skipped and every weight,
    buffer (EMA codebook statistics, usage counts) and optimiser state stays bit-identical,
    although the quantizer's forward updates its EMA codebook in place."""
    obj = debug_objective(
        "loss.gan_weight=0.1", "loss.disc_start=0",
        "model.quantizer={type: vq, codebook_size: 16, update: ema, cvq: true}",
    )  # fmt: skip
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    terms, _ = obj.micro_step(x, 0)  # one real step first: Adam has moments to keep
    assert terms is not None

    def snapshot():
        out = {f"model/{k}": v.clone() for k, v in obj.model.state_dict().items()}
        out.update({f"disc/{k}": v.clone() for k, v in obj.disc.state_dict().items()})
        for name, engine in obj.engines.items():
            adam = getattr(engine.optimizer, "optimizer", engine.optimizer)  # inside ZeRO
            for i, state in adam.state_dict()["state"].items():
                out.update({f"{name}/adam{i}/{k}": torch.as_tensor(v).clone()
                            for k, v in state.items()})  # fmt: skip
            for i, group in enumerate(adam.param_groups):  # ZeRO's fp32 master partitions
                out.update({f"{name}/master{i}/{j}": p.detach().clone()
                            for j, p in enumerate(group["params"])})  # fmt: skip
        return out

    before = snapshot()
    # a NaN in the input: the latents are NaN; the quantizer sees zeros instead (its own test,
    # a second host sync, is off in training) and the step's one check skips the step
    assert not obj.model.quantizer.check_finite
    bad = x.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    assert obj.micro_step(bad, 1) == (None, False)
    assert _same(before, snapshot()) == []
    # finite latents (the EMA codebook and CVQ update in place) but an inf reconstruction
    hook = obj.model.register_forward_hook(lambda m, i, out: (out[0] * float("inf"), out[1]))
    ema_sum = obj.model.quantizer.codebook.ema_sum.clone()
    seen = obj.model.quantizer.register_forward_hook(
        lambda m, i, out: seen_sums.append(m.codebook.ema_sum.clone())
    )
    seen_sums: list = []
    assert obj.micro_step(x, 1) == (None, False)
    hook.remove(), seen.remove()
    assert not torch.equal(seen_sums[0], ema_sum)  # the forward did move the codebook ...
    assert _same(before, snapshot()) == []  # ... and the skip put it back, with all else
    assert obj.micro_step(x, 1)[0] is not None  # a finite step does change them
    assert _same(before, snapshot()) != []


def _poison(monkeypatch, bad) -> None:
    """NaN model inputs at the micro-steps (counted from 1) for which `bad(n)` holds: a
    real non-finite forward, injected at the loop's model-input seam."""
    import pipelines.training.loop as loop

    real, calls = loop.to_model_input, {"n": 0}

    def poisoned(video, device):
        x = real(video, device)
        calls["n"] += 1
        return x * float("nan") if bad(calls["n"]) else x

    monkeypatch.setattr(loop, "to_model_input", poisoned)


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_counted_and_logged(shards, tmp_path, monkeypatch):
    """Two micro-steps get a NaN input: both are skipped, the run goes on to the end, and
    the count is in the metrics and the train state."""
    _poison(monkeypatch, lambda n: n in (3, 4))
    cfg = _config(shards, tmp_path, "nan", "train.steps=4", "train.log_every=1",
                  "loss.gan_weight=0", "train.max_nonfinite_steps=3")  # fmt: skip
    metrics = fit(cfg, local=True)
    assert metrics["train/nonfinite_steps"] == 2
    state = _state(ckpt.latest(cfg.run.run_dir))
    assert (state.step, state.micro_step, state.nonfinite_steps) == (4, 6, 2)
    logged = {r["step"]: r["metrics"]["train/nonfinite_steps"] for r in _rows(cfg.run.run_dir)
              if "train/nonfinite_steps" in r["metrics"]}  # fmt: skip
    assert logged == {1: 0, 2: 0, 3: 2, 4: 2}


@pytest.mark.slow
def test_nonfinite_streak_stops_with_a_checkpoint_from_before_the_first_bad_step(
    shards, tmp_path, monkeypatch
):
    """Every input from the third micro-step on is NaN. After `train.max_nonfinite_steps`
    bad micro-steps in a row the run stops with an error naming them, and the checkpoint it
    leaves holds exactly the weights of the last good step: those of a run of 2 steps."""
    extra = ["loss.gan_weight=0", "train.ckpt_every=100", "train.log_every=1"]
    cfg = _config(shards, tmp_path, "stream", "train.steps=10", "train.max_nonfinite_steps=3",
                  *extra)  # fmt: skip
    _poison(monkeypatch, lambda n: n >= 3)
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row \(micro-steps "
                       r"2 to 4, after optimiser step 2") as err:  # fmt: skip
        fit(cfg, local=True)
    assert "step_00000002" in str(err.value)
    found = ckpt.latest(cfg.run.run_dir)
    assert found.name == "step_00000002"
    state = ckpt.check_loadable(found)["state"]
    assert (state.step, state.nonfinite_steps, state.nonfinite_streak) == (2, 3, 3)

    monkeypatch.undo()
    two = _config(shards, tmp_path, "two_steps", "train.steps=2", *extra)
    fit(two, local=True)
    assert _same(_weights(found), _weights(ckpt.latest(two.run.run_dir))) == []


def test_training_survives_the_tracking_server_dying(shards, tmp_path, caplog, monkeypatch):
    """A real `mlflow server` SIGKILLed mid-run: training finishes, every metric is kept in
    the run folder, the outage is reported once, and once a server is back on the same store
    `sync_journal` delivers each step exactly once."""
    import logging
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from pipelines.tracking.server import start_mlflow_server, stop_mlflow_server
    from pipelines.tracking.tracker import sync_journal

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    backend, artifacts = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "mlartifacts"
    proc, url = start_mlflow_server(backend, artifacts)
    cfg = _config(shards, tmp_path, "down", "train.steps=12", "train.log_every=1",
                  "train.ckpt_every=12", "loss.gan_weight=0", f"run.tracking_uri={url}")  # fmt: skip
    run_dir = cfg.run.run_dir

    def kill_after_first_rows():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            f = run_dir / "metrics.jsonl"
            if f.exists() and len(f.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        stop_mlflow_server(proc, kill=True)

    killer = threading.Thread(target=kill_after_first_rows)
    caplog.set_level(logging.WARNING, logger="vqtok.tracking")
    try:
        killer.start()
        fit(cfg, local=True)
        killer.join()
        steps = [r["step"] for r in _rows(run_dir) if "train/total" in r["metrics"]]
        assert steps == list(range(1, 13))  # all kept locally
        outages = [r for r in caplog.records if r.name == "vqtok.tracking"
                   and url in r.getMessage()]  # fmt: skip
        assert len(outages) == 1, [r.getMessage() for r in outages]
        client = MlflowClient(url)
        proc, _ = start_mlflow_server(backend, artifacts, port=int(url.rsplit(":", 1)[1]))
        assert sync_journal(run_dir) > 0
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        history = client.get_metric_history(run_id, "train/total")
        assert sorted(m.step for m in history) == list(range(1, 13))  # each exactly once
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        killer.join()
        stop_mlflow_server(proc)
