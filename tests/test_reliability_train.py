"""Training-side faults, each injected for real on CPU (issue 9): a Ray Train worker killed
mid-run, non-finite losses (transient, and a diverging run), the tracking server dying.
Checkpoint faults are in test_reliability_checkpoints.py; docs/RELIABILITY.md lists what
survives each."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from train_runs import debug_config, registered, rows

from pipelines.store import checkpoint as ckpt
from pipelines.training.launch import fit
from pipelines.training.loop import NonFiniteLossError


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


def _kill_a_worker_after(run_dir: Path, name: str, log: dict) -> None:
    """Wait until Ray registered checkpoint `name`, SIGKILL one Train worker, then wait for
    the new group to start (new worker PIDs)."""
    deadline = time.time() + 300
    while time.time() < deadline and registered(run_dir) != name:
        time.sleep(0.05)
    before = _train_workers()
    if not before:
        return
    victim = max(before)
    os.kill(victim, signal.SIGKILL)
    log["killed"], log["after"] = victim, registered(run_dir)
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
    clean = fit(debug_config(shards, tmp_path, "clean", *steps))

    cfg = debug_config(shards, tmp_path, "killed", *steps)
    log: dict = {}
    killer = threading.Thread(
        target=_kill_a_worker_after, args=(cfg.run.run_dir, "step_00000006", log)
    )
    killer.start()
    killed = fit(cfg)
    killer.join()
    assert log.get("after") == "step_00000006" and log.get("restarted"), log
    logged = [r["step"] for r in rows(cfg.run.run_dir) if "train/total" in r["metrics"]]
    assert logged[:2] == [3, 6] and 3 not in logged[2:] and 6 not in logged[2:], logged

    a, b = ckpt.latest(tmp_path / "clean"), ckpt.latest(cfg.run.run_dir)
    assert a.name == b.name == "step_00000018"
    assert _same(_weights(a), _weights(b)) == []
    keys = [k for k in clean if not k.startswith(NOT_IDENTICAL)]
    assert "eval/psnr" in keys and "train/total" in keys
    assert {k: killed[k] for k in keys} == {k: clean[k] for k in keys}
    assert _state(b).epoch == _state(a).epoch and _state(b).micro_step == 18


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
    cfg = debug_config(shards, tmp_path, "nan", "train.steps=4", "train.log_every=1",
                       "loss.gan_weight=0", "train.max_nonfinite_steps=3")  # fmt: skip
    metrics = fit(cfg, local=True)
    assert metrics["train/nonfinite_steps"] == 2
    state = _state(ckpt.latest(cfg.run.run_dir))
    assert (state.step, state.micro_step, state.nonfinite_steps) == (4, 6, 2)
    logged = {r["step"]: r["metrics"]["train/nonfinite_steps"] for r in rows(cfg.run.run_dir)
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
    cfg = debug_config(shards, tmp_path, "stream", "train.steps=10", "train.max_nonfinite_steps=3",
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
    two = debug_config(shards, tmp_path, "two_steps", "train.steps=2", *extra)
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
    cfg = debug_config(shards, tmp_path, "down", "train.steps=12", "train.log_every=1",
                       "train.ckpt_every=12", "loss.gan_weight=0",
                       f"run.tracking_uri={url}")  # fmt: skip
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
        steps = [r["step"] for r in rows(run_dir) if "train/total" in r["metrics"]]
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
