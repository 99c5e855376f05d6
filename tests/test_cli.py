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
