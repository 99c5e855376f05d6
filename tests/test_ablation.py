"""`vqtok ablate`: the study files, the seeds aggregated into one table and the paper's
orderings checked, on fixed numbers. The data and real tiny runs of every study:
tests/test_ablation_studies.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipelines.config import ConfigError
from pipelines.studies.ablation import format_table, load_study, quantizer_label, variant_label
from pipelines.studies.ablation_page import (
    read_discussions,
    read_sections,
    reproduced_line,
    results_page,
    results_section,
)
from pipelines.studies.ablation_report import (
    aggregate,
    check_ordering,
    check_orderings,
    format_orderings,
    format_results,
    merge_runs,
)
from vqcore.models import model_config
from vqcore.quantizers.gvq import GVQConfig

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "jobs" / "pvq_ablation.yaml"
STUDIES = sorted([STUDY, *(ROOT / "jobs").glob("ablate_*.yaml")])


def _pvqvae(flavour: str, **fields):
    """The typed PVQ-VAE config of `flavour` with `fields` replaced."""
    return model_config({"type": "pvqvae", "flavour": flavour, **fields})


def test_study_has_the_seed_variants_and_sizes():
    study = load_study(STUDY, scale="cpu")
    seed_rows = ["vq", "gvq", "lfq", "rvq", "psvq", "rvq_lfq", "pvq"]  # Table 1's rows
    assert list(study.configs) == [*seed_rows, "pvq_every_level"]
    assert set(study.spec["reference"]["values"]) == set(seed_rows)
    assert study.spec["reference"]["values"]["pvq"] == "35.12 / 36.01"
    q = {k: c.model.quantizer for k, c in study.configs.items()}
    assert q["vq"] == {"type": "vq", "codebook_size": 4096}
    # Gumbel's τ anneals to its floor 0.5 at 2/3 of the run at either scale (cpu: 3,000 steps)
    assert q["gvq"] == {"type": "gvq", "codebook_size": 4096, "anneal_rate": 0.0003466}
    floor_at = study.configs["gvq"].train.steps * 2 / 3
    assert math.exp(-0.0003466 * floor_at) == pytest.approx(0.5, 1e-3)
    assert q["psvq"]["type"] == "pyramid" and q["psvq"]["inner"]["codebook_size"] == 8000
    assert q["rvq"]["inner"]["codebook_size"] == 8000
    for name in ("lfq", "rvq_lfq", "pvq", "pvq_every_level"):
        spec = q[name].get("inner", q[name])
        assert spec == {"type": "lfq", "codebook_dim": 16, "entropy_weight": 0.02}
    assert q["pvq_every_level"] == {**q["pvq"], "level_loss_weights": [1, 1, 1]}
    for name, cfg in study.configs.items():  # one folder per variant (and seed) under the study's
        assert cfg.run.run_dir == study.folder / name
        assert cfg.model == _pvqvae("debug", quantizer=cfg.model.quantizer)
        assert not cfg.scaling.use_gpu
    assert study.seeds == [0, 1, 2] and study.data["out"].endswith("runs/ablation_data")
    assert study.configs["pvq"].data.shards == (study.data["out"] + "/train-*.tar",)
    gpu = load_study(STUDY, ["train.steps=7"], scale="gpu", variants=["pvq", "vq"])
    assert list(gpu.configs) == ["pvq", "vq"] and gpu.seeds == [42] and gpu.data is None
    assert all(c.scaling.use_gpu and c.train.steps == 7 for c in gpu.configs.values())
    assert gpu.configs["pvq"].model == _pvqvae("default", latent_dim=16, quantizer=q["pvq"])
    seed_decoder = load_study(STUDY, scale="gpu", variants=["pvq_seed_decoder"])  # gpu only
    model = seed_decoder.configs["pvq_seed_decoder"].model
    assert model.decoder_blocks == 3 and model.quantizer == q["pvq"]
    assert "pvq_seed_decoder" not in study.configs
    gvq = load_study(STUDY, scale="gpu", variants=["gvq"]).configs["gvq"]  # 1e-5 over 10^5 steps
    assert gvq.model.quantizer == {"type": "gvq", "codebook_size": 4096}
    assert GVQConfig().anneal_rate == 1e-5 and gvq.train.steps == 100000


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_loads_at_every_scale_with_its_orderings(path):
    for scale in ("tiny", "cpu", "gpu"):
        study = load_study(path, scale=scale)
        assert study.spec.get("title") and study.spec.get("claim") and study.spec.get("source")
        for better, worse, metric, *_ in study.spec["orderings"]:
            assert {better, worse} <= set(study.configs) and metric.startswith(("eval/", "train/"))
        if scale == "tiny":  # what the tests run: one seed, a few steps, one process
            assert study.seeds == [0] and study.spec.get("parallel", 1) == 1
            assert all(c.train.steps <= 4 for c in study.configs.values())
        if scale == "cpu":
            assert len(study.seeds) >= 3 and study.data is not None
        labels = {variant_label(c) for c in study.configs.values()}
        assert len(labels) == len(study.configs)  # the second column tells the rows apart


def test_study_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="not one of"):
        load_study(STUDY, scale="tpu")
    with pytest.raises(ConfigError, match="nope"):
        load_study(STUDY, variants=["nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        STUDY.read_text().replace("vq: {type: vq, codebook_size", "vq: {type: vq, codebook_sise")
    )
    with pytest.raises(ConfigError, match="variant 'vq'.*codebook_sise"):
        load_study(bad)
    with pytest.raises(ConfigError, match="unknown ablation key.*seedz"):
        load_study(STUDY, ["ablation.seedz=[1]"])
    with pytest.raises(ConfigError, match="'psvqq' is not a variant"):
        load_study(STUDY, ["ablation.orderings=[[pvq, psvqq, eval/psnr, true]]"])
    with pytest.raises(ConfigError, match="list of integers"):
        load_study(STUDY, ["ablation.seeds=[a]"])


def _study_file(folder: Path) -> Path:
    path = folder / "study.yaml"
    path.write_text(
        "ablation:\n  study: s\n  seeds: [3, 4]\n  data: {out: d}\n  variants:\n"
        "    wide: {quantizer: {type: vq, codebook_size: 64}, model.latent_dim: 32}\n"
        "    nofft: {model.use_fft: false}\n"
        "    img: {model: {type: image_tokenizer, flavour: vqvae_debug}}\n"
        "  scales: {small: {ablation.seeds: [9], train.steps: 3}, cpu: {}}\n"
        "model: {type: pvqvae, flavour: debug}\n"
        "data: {shards: ['{data}/train-*.tar']}\n"
        "train: {eval_shards: ['{data}/val-*.tar']}\n"
        f"run: {{storage: '{folder / 'runs'}'}}\n"
    )
    return path


def test_variants_overrides_and_sections(tmp_path):
    path = _study_file(tmp_path)
    study = load_study(path)
    cfg = study.configs["wide"]
    assert cfg.model.latent_dim == 32 and cfg.model.quantizer["codebook_size"] == 64
    assert study.configs["nofft"].model == _pvqvae("debug", use_fft=False)
    assert study.configs["img"].model == model_config(
        {"type": "image_tokenizer", "flavour": "vqvae_debug"})
    assert study.seeds == [3, 4]
    assert cfg.data.shards == (str(Path("d").resolve() / "train-*.tar"),)
    assert cfg.train.eval_shards == (str(Path("d").resolve() / "val-*.tar"),)
    small = load_study(path, ["ablation.data.out=/tmp/x"], scale="small")
    assert small.seeds == [9] and small.configs["img"].train.steps == 3
    assert small.configs["img"].data.shards == ("/tmp/x/train-*.tar",)
    assert load_study(path, ["ablation.seeds=[1]"], scale="small").seeds == [1]  # CLI last
    assert variant_label(study.configs["nofft"]).endswith("w/o FFT")


# --- the table and the orderings, on fixed numbers ---------------------------------------


def _run(variant, seed, psnr, mse=None, error=None, seconds=10.0):
    metrics = {"eval/psnr": psnr} if psnr is not None else {}
    if mse is not None:
        metrics["eval/mse"] = mse
    row = {"variant": variant, "seed": seed, "quantizer": f"q-{variant}", "steps": 2,
           "seconds": seconds, "metrics": metrics}  # fmt: skip
    return row | ({"error": error} if error else {})


RUNS = [
    _run("a", 0, 30.0, 0.010), _run("a", 1, 31.0, 0.012), _run("a", 2, 32.0, 0.011),
    _run("b", 0, 28.0, 0.020), _run("b", 1, 29.5, 0.030), _run("b", 2, 29.0, 0.025),
    _run("c", 0, 30.5, 0.013), _run("c", 1, 33.0, 0.009), _run("c", 2, 29.9, 0.012),
    _run("d", 0, None, error="RuntimeError: boom | bad"), _run("e", 0, 35.0, 0.001),
]  # fmt: skip


def test_aggregate_over_seeds():
    summary = {r["variant"]: r for r in aggregate(RUNS)}
    assert list(summary) == ["a", "b", "c", "d", "e"]
    a = summary["a"]["stats"]["eval/psnr"]
    assert (a["mean"], a["min"], a["max"], a["n"]) == (31.0, 30.0, 32.0, 3)
    assert a["std"] == pytest.approx(1.0)  # sample std of 30, 31, 32
    assert summary["a"]["seeds"] == [0, 1, 2] and summary["a"]["seconds"] == 10.0
    assert summary["d"]["stats"] == {} and summary["d"]["errors"] == ["RuntimeError: boom | bad"]
    assert summary["e"]["stats"]["eval/psnr"]["std"] == 0.0


def test_table_on_fixed_numbers():
    summary = aggregate(RUNS)
    reference = {"title": "paper PSNR", "values": {"a": "31.45", "b": "30.00"}}
    table = format_table(summary, ["eval/psnr", "eval/ssim", "eval/mse"], reference)
    assert table.splitlines() == [
        "| variant | quantizer | PSNR dB | MSE | paper PSNR | seeds | steps | time s | status |",
        "|---|---|---|---|---|---|---|---|---|",
        "| a | q-a | 31.00 ± 1.00 | 0.01100 ± 0.00100 | 31.45 | 3 | 2 | 10 | ok |",
        "| b | q-b | 28.83 ± 0.76 | 0.02500 ± 0.00500 | 30.00 | 3 | 2 | 10 | ok |",
        "| c | q-c | 31.13 ± 1.64 | 0.01133 ± 0.00208 | — | 3 | 2 | 10 | ok |",
        "| d | q-d | — | — | — | 0 | 2 | 10 | failed ×1: RuntimeError: boom / bad |",
        "| e | q-e | 35.00 | 0.00100 | — | 1 | 2 | 10 | ok |",
    ]  # SSIM: no row has it, no column; one seed: no spread shown
    assert "paper" not in format_table(summary, ["eval/psnr"])


def test_rows_below_bicubic_at_their_rate_are_marked():
    runs = [_run("x", 0, 20.0) | {"metrics": {"eval/psnr": 20.0, "eval/beats_rate": 0.0,
                                              "eval/bits_per_pixel": 1.5}},
            _run("y", 0, 25.0) | {"metrics": {"eval/psnr": 25.0, "eval/beats_rate": 1.0,
                                              "eval/bits_per_pixel": 1.5}}]  # fmt: skip
    lines = format_table(aggregate(runs), ["eval/psnr", "eval/bits_per_pixel"]).splitlines()
    assert lines[0].startswith("| variant | quantizer | PSNR dB | bits/pixel |")
    assert lines[2].startswith("| x ↓ |") and lines[3].startswith("| y |")


def test_ordering_verdicts_on_fixed_numbers():
    s = aggregate(RUNS)
    yes = check_ordering(s, "a", "b", "eval/psnr", True)  # a: 30-32, b: 28-29.5
    assert yes["verdict"] == "yes" and yes["direction"] == "agrees"
    assert yes["gap"] == pytest.approx(31.0 - 28.8333333) and yes["spread"] == 2.0
    assert check_ordering(s, "b", "a", "eval/psnr")["verdict"] == "no"  # reversed beyond spread
    overlap = check_ordering(s, "c", "a", "eval/psnr")  # c: 29.9-33 overlaps a: 30-32
    assert overlap["verdict"] == "inconclusive" and overlap["direction"] == "agrees"
    lower = check_ordering(s, "a", "b", "eval/mse", False)  # a: 0.010-0.012 < b: 0.020-0.030
    assert lower["verdict"] == "yes" and lower["gap"] > 0
    assert check_ordering(s, "b", "a", "eval/mse", False)["verdict"] == "no"
    one_seed = check_ordering(s, "e", "a", "eval/psnr")  # e beats every a, but one seed
    assert one_seed["verdict"] == "inconclusive" and one_seed["direction"] == "agrees"
    assert check_ordering(s, "d", "a", "eval/psnr")["verdict"] == "not run"  # failed
    assert check_ordering(s, "a", "zz", "eval/psnr")["verdict"] == "not run"  # not selected
    assert check_ordering(s, "a", "b", "eval/lpips")["verdict"] == "not run"  # no metric
    checks = check_orderings(s, [["a", "b", "eval/psnr", True], ["a", "b", "eval/mse", False]])
    assert format_orderings(checks).splitlines()[2:] == [
        "| a > b | PSNR dB ↑ | 31.00 | 28.83 | 2.17 | 2.00 | agrees | yes |",
        "| a > b | MSE ↓ | 0.01100 | 0.02500 | 0.01400 | 0.01000 | agrees | yes |",
    ]


def test_results_page_and_section_on_fixed_numbers():
    summary = aggregate(RUNS[:6])
    result = {"summary": summary, "runs": RUNS[:6], "columns": ["eval/psnr"], "scale": "cpu",
              "seeds": [0, 1, 2], "device": "CPU, 2 cores", "command": "vqtok ablate x.yaml",
              "orderings": check_orderings(summary, [["a", "b", "eval/psnr", True]]),
              "data": {"train": {"sources": 18, "samples": 208, "images": 128, "videos": 80,
                                 "frames": 1946, "MB": 6.0}}}  # fmt: skip
    text = format_results(result)
    assert "| a | q-a | 31.00 ± 1.00 |" in text and "| a > b | PSNR dB ↑ |" in text
    assert "| a seed=1 | 31.00 | 10 | ok |" in text  # every run, behind the spread
    assert "colour kept" not in text  # no run logged it
    # colour kept is shown after PSNR (and SSIM) wherever a run logged it, listed or not
    logged = [{**r, "metrics": {**r["metrics"], "eval/chroma_kept": 0.25}} for r in RUNS[:6]]
    coloured = format_results({**result, "runs": logged, "summary": aggregate(logged)})
    assert "| variant | quantizer | PSNR dB | colour kept |" in coloured
    assert "| a seed=1 | 31.00 | 0.25 | 10 | ok |" in coloured
    assert "- command: `vqtok ablate x.yaml`" in text and "train 18 sources, 208 samples" in text
    study = {"title": "T", "source": "seed 9, Tab. 1", "claim": "a beats b.",
             "orderings": [["a", "b", "eval/psnr", True], ["a", "b", "eval/mse", False]],
             "command": "vqtok ablate x.yaml --local"}  # fmt: skip
    pending = results_section(study, None)
    assert pending.startswith("## T\n") and "**Claim** (seed 9, Tab. 1): a beats b." in pending
    assert "a > b on PSNR dB, a > b on MSE (lower is better)" in pending
    assert "not yet run at cpu scale" in pending and "| a |" not in pending
    done = results_section({**study, "study": "s"}, result, "Ours agrees: b is smaller.")
    assert "| a | q-a | 31.00 ± 1.00 |" in done
    page = f"# R\n\n{done}\n## Other\n"
    assert read_discussions(page) == {"s": "Ours agrees: b is smaller."}  # kept on rewrite
    # a study with no results here keeps its whole section; the top line counts its verdicts
    kept = read_sections(page)
    assert list(kept) == ["s"] and kept["s"].startswith("## T\n") and "| a | q-a |" in kept["s"]
    line = reproduced_line({**kept, "t": pending})
    assert line.startswith("**Orderings reproduced beyond the seed spread**: 1 of 1 checked")
    assert "s 1/1" in line and "t not run" in line


def test_a_study_run_in_parts_merges_by_recipe(tmp_path):
    path = _study_file(tmp_path)
    whole = load_study(path, [f"run.storage={tmp_path / 'a'}"])
    part = load_study(path, [f"run.storage={tmp_path / 'b'}", "train.seed=5"], variants=["nofft"])
    assert list(part.configs) == ["nofft"] and part.recipes == whole.recipes  # storage, seed aside
    assert len(set(whole.recipes.values())) == 3
    longer = load_study(path, ["train.steps=9"])
    assert not set(longer.recipes.values()) & set(whole.recipes.values())

    def rows(variant, seeds, rev):
        return [{**_run(variant, s, 30.0 + s), "recipe": whole.recipes[variant], "git": rev}
                for s in seeds]  # fmt: skip

    earlier = {"scale": "cpu", "git": "aaa",
               "runs": rows("wide", [0, 1], "aaa") + rows("nofft", [0], "aaa")}  # fmt: skip
    now = rows("img", [0], "bbb") + rows("nofft", [0, 1], "bbb")
    merged, kept = merge_runs(earlier, now, whole.recipes, "cpu")
    assert kept == ["wide"]  # nofft ran again: its earlier row goes
    assert [(r["variant"], r["seed"], r["git"]) for r in merged] == [
        ("wide", 0, "aaa"), ("wide", 1, "aaa"), ("nofft", 0, "bbb"), ("nofft", 1, "bbb"),
        ("img", 0, "bbb")]  # fmt: skip
    assert merge_runs(earlier, now, longer.recipes, "cpu")[1] == []  # another recipe
    assert merge_runs(earlier, now, whole.recipes, "tiny")[1] == []  # another scale
    assert merge_runs(None, now, whole.recipes, "cpu") == (now, [])

    # the page keeps a study's section until every part has run, then writes it anew
    cpu = load_study(path, scale="cpu")
    cpu.folder.mkdir(parents=True)  # (the file's run.storage: under tmp_path)
    section = "## S\n\nold table\n<!-- discussion:s (kept) -->\nold words\n<!-- /discussion:s -->\n"
    summary = aggregate(merged[:2])
    (cpu.folder / "results.json").write_text(json.dumps(
        {"scale": "cpu", "variants": ["wide"], "runs": merged[:2], "summary": summary,
         "columns": ["eval/psnr"], "orderings": []}))  # fmt: skip
    kept = tmp_path / "results"  # beside the page: the part is kept for another machine
    assert "old table" in results_page([path, path], previous=section, kept=kept)  # 2 files
    assert json.loads((kept / "s.json").read_text())["variants"] == ["wide"]
    summary = aggregate(merged)
    (cpu.folder / "results.json").write_text(json.dumps(
        {"scale": "cpu", "variants": ["wide", "nofft", "img"], "runs": merged,
         "summary": summary, "columns": ["eval/psnr"], "orderings": []}))  # fmt: skip
    page = results_page([path], previous=section, kept=kept)
    assert "old table" not in page and "| wide seed=1 | 31.00 |" in page and "old words" in page
    (cpu.folder / "results.json").unlink()  # the storage gone: the kept copy writes the page
    assert results_page([path], previous=section, kept=kept) == page


def test_quantizer_labels():
    assert quantizer_label({"type": "vq", "codebook_size": 4096}) == "vq K=4096"
    assert quantizer_label({"type": "rvq", "num_quantizers": 3,
                            "inner": {"type": "vq", "codebook_size": 8000}}) == "rvq(vq K=8000) ×3"  # fmt: skip
    assert quantizer_label({"type": "looc", "codebook_size": 64, "codebook_dim": 4,
                            "alpha": 2}) == "looc K=64 d=4 α=2"  # fmt: skip
    assert quantizer_label({"type": "looc", "codebook_size": 64, "codebook_dim": 4, "alpha": 2,
                            "grouping": "patch"}) == "looc K=64 d=4 α=2 patch"  # fmt: skip
    assert quantizer_label({"type": "hrvq", "codebook_size": 16, "num_layers": 3}) == "hrvq K=16 ×3"
    assert quantizer_label({"type": "pyramid", "scales": [4, 2, 1], "level_loss_weights": [1, 1, 1],
                            "inner": {"type": "lfq", "codebook_dim": 16}}) == \
        "pyramid(lfq d=16) ×3 losses 1/1/1"  # fmt: skip


def test_timings_take_the_fastest_call():
    """A study's ms/img is the fastest of its repeated calls: a call slowed by another process
    (a study's parallel run) must not move the figure."""
    import time

    import torch

    from pipelines.studies.ablation_metrics import TIMING_REPEATS, _fastest

    delays = iter([0.05] + [0.002] * (TIMING_REPEATS - 1))  # the first call interfered with
    seconds = _fastest(lambda x: time.sleep(next(delays)), torch.zeros(2, 3), torch.device("cpu"))
    assert 0.001 <= seconds < 0.01  # per sample: the fast calls' 2 ms / 2, not the mean
