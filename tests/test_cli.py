"""The `vqtok` command stays small: a fixed set of verbs, each with its own help."""

import subprocess
import sys

import pytest

from pipelines.cli import VERBS, build_parser

EXPECTED = {"demo", "demo-data", "shards", "inspect", "train", "eval", "tune", "quantizers",
            "cluster", "ablate", "tokenize", "detokenize"}  # fmt: skip


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
