"""The `vqtok` command stays small: a fixed set of verbs, each with its own help."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import VERBS, build_parser

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {"demo", "demo-data", "shards", "inspect", "train", "eval", "tune", "quantizers",
            "cluster", "submit", "ablate", "tokenize", "detokenize"}  # fmt: skip


def test_verbs_are_pinned():
    """New settings go into config files, not new verbs or flags (torchtitan's rule)."""
    assert set(VERBS) == EXPECTED


@pytest.mark.parametrize("verb", sorted(EXPECTED))
def test_every_verb_builds_its_parser(verb):
    parser = build_parser([verb])
    with pytest.raises(SystemExit) as done:
        parser.parse_args([verb, "--help"])
    assert done.value.code == 0


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    for verb in EXPECTED:
        assert verb in out.stdout


@pytest.mark.parametrize(
    "argv, config, overrides, local",
    [
        (["train", "jobs/debug.yaml", "train.steps=3", "--local"], "jobs/debug.yaml",
         ["train.steps=3"], True),
        (["train", "jobs/debug.yaml", "--local", "train.steps=3", "optim.lr=0.1"],
         "jobs/debug.yaml", ["train.steps=3", "optim.lr=0.1"], True),
        (["train", "jobs/debug.yaml", "a.b=1", "--local", "c.d=2"], "jobs/debug.yaml",
         ["a.b=1", "c.d=2"], True),
    ],
)  # fmt: skip
def test_overrides_may_follow_options(argv, config, overrides, local):
    """Issue 22 item 6: `vqtok train job.yaml --local train.steps=3` was 'unrecognized'."""
    from pipelines.cli import parse

    args = parse(argv)
    assert str(args.config) == config and args.overrides == overrides and args.local is local


def test_a_stray_word_after_options_is_still_an_error(capsys):
    from pipelines.cli import parse

    with pytest.raises(SystemExit) as done:
        parse(["train", "jobs/debug.yaml", "--local", "oops"])
    assert done.value.code == 2 and "unrecognized arguments: oops" in capsys.readouterr().err


def _vqtok(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize(
    "case, args, code, says",
    [
        ("yaml syntax", ["train", "{bad}", "--local"], 2,
         r"bad\.yaml: not valid YAML: .* at line 3, column \d+"),
        ("override not yaml", ["train", "jobs/debug.yaml", "optim.lr=[1,", "--local"], 2,
         r"override 'optim\.lr=\[1,': the value is not valid YAML"),
        ("python tag", ["train", "jobs/debug.yaml", "optim.lr=!!python/object/apply:os.system [ls]"],
         2, r"could not determine a constructor for the tag"),
        ("missing model", ["eval", "--model", "/nonexistent", "--data", "x/*.tar"], 1,
         r"/nonexistent: not an MLflow model URI"),
        ("empty glob", ["inspect", "/nonexistent-dir/*.tar"], 1, r"nothing read: 1 of 1 shard"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line(tmp_path, case, args, code, says):
    """Issue 21 item 4: each user mistake is one line on stderr naming what was wrong, exit 2
    (usage) or 1 (run failed), no traceback."""
    import re

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  flavour: [debug\noptim: {lr: 1}\n")
    out = _vqtok(*[a.replace("{bad}", str(bad)) for a in args], cwd=ROOT)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("vqtok ")]
    assert out.returncode == code, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-2000:]
    assert re.search(says, lines[0]), lines[0]


def test_debug_shows_the_traceback():
    out = _vqtok("eval", "--model", "/nonexistent", "--data", "x/*.tar", "--debug", cwd=ROOT)
    assert out.returncode != 0 and "Traceback" in out.stderr and "ModelLoadError" in out.stderr


def test_train_help_lists_every_config_section(capsys):
    from pipelines.config import SECTIONS, Config

    assert list(SECTIONS) == list(Config.__dataclass_fields__)
    with pytest.raises(SystemExit):
        build_parser(["train"]).parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {k} " in out for k in SECTIONS) and "example: vqtok train" in out


def test_tokenize_and_detokenize_have_their_own_required_arguments(capsys):
    for verb, required in (("tokenize", "--model"), ("detokenize", "--tokens")):
        with pytest.raises(SystemExit) as done:
            build_parser([verb]).parse_args([verb, "--out", "x"])
        assert done.value.code == 2 and required in capsys.readouterr().err


def test_submit_keeps_what_follows_the_double_dash(monkeypatch):
    """`vqtok submit -- CMD`: CMD is the job's, `--verbose`/`--debug` in it included; a missing
    command or cluster is a one-line error (exit 2) before anything is uploaded."""
    import os

    from pipelines.cli import main, parse

    args = parse(["submit", "--address", "http://h:8265", "--", "vqtok", "train", "x.yaml",
                  "train.steps=3", "--verbose"])  # fmt: skip
    assert args.command == ["--", "vqtok", "train", "x.yaml", "train.steps=3", "--verbose"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("VQTOK_VERBOSE", raising=False)
    assert main(["submit", "--", "vqtok", "train", "x.yaml", "--verbose"]) == 2
    assert "VQTOK_VERBOSE" not in os.environ  # the job's flag, not this process's
    assert main(["submit"]) == 2
