"""Security defaults: no code runs from data, servers listen on loopback.

Static: an AST scan of `pipelines/`, `vqcore/` and `benchmarks/` finds every `torch.load`
without `weights_only=True`, any YAML loader but the safe one, `eval`/`exec`, pickle-family
imports, `np.load(allow_pickle=True)`, tar extraction to disk and `shell=True`. Bind hosts:
the command lines `vqtok` builds for `mlflow server` and `ray start --head`, the CLI default
and `init_ray`'s dashboard. Dynamic: a checkpoint and a config that would run code if
unpickled or YAML-constructed are refused, and the code does not run. Nothing is started.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.cli import build_parser
from pipelines.cluster import connect
from pipelines.cluster import local as cluster
from pipelines.config import ConfigError, load_config
from pipelines.store.checkpoint import CheckpointError, load_ema
from pipelines.tracking import server as mlflow_server

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("pipelines", "vqcore", "benchmarks") for p in (ROOT / d).rglob("*.py"))
PICKLE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "marshal",
    "shelve",
    "joblib",
}
SAFE_YAML = {"safe_load", "safe_load_all", "safe_dump", "dump", "YAMLError"}


def _dotted(node: ast.AST) -> str:
    """`torch.load` for `torch.load(...)`'s func; "" when not a plain name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def _kw(call: ast.Call, name: str):
    """The constant value of keyword `name`, `...` when absent, None when not a constant."""
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else None
    return ...


def _findings(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            out += [f"{where} imports {n}" for n in names if n.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = node.func.attr if isinstance(node.func, ast.Attribute) else name
        if name == "torch.load" and _kw(node, "weights_only") is not True:
            out.append(f"{where} torch.load without weights_only=True")
        elif name.startswith("yaml.") and last not in SAFE_YAML:
            out.append(f"{where} {name} (use yaml.safe_load)")
        elif name in ("eval", "exec", "__import__"):
            out.append(f"{where} {name}()")
        elif (
            last == "load"
            and name.split(".")[0] in ("np", "numpy")
            and _kw(node, "allow_pickle") not in (..., False)
        ):
            out.append(f"{where} {name} with allow_pickle")
        elif last in ("read_pickle", "extractall") or (last == "extract" and "tar" in name.lower()):
            out.append(f"{where} {name}()")
        elif _kw(node, "shell") not in (..., False):
            out.append(f"{where} {name}(shell=...)")
        elif last == "read_webdataset" and _kw(node, "decoder") is not None:
            out.append(f"{where} read_webdataset with a decoder (may unpickle members)")
    return out


def test_sources_found():
    assert len(SOURCES) > 30 and any(p.name == "checkpoint.py" for p in SOURCES)


def test_no_code_from_data_in_sources():
    """torch.load(weights_only=True), yaml.safe_load, no eval/exec/pickle, no tar extraction."""
    findings = [f for p in SOURCES for f in _findings(p)]
    assert not findings, "\n".join(findings)


def test_scanner_catches_each_pattern(tmp_path):
    """The scan is only as good as its patterns: each one must be caught."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, yaml, numpy as np, tarfile\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nyaml.load(s)\nyaml.unsafe_load(s)\n"
        "eval('1')\nexec('1')\nnp.load('x', allow_pickle=True)\ntarfile.open('t').extractall()\n"
        "subprocess.run('ls', shell=True)\nray.data.read_webdataset(p)\n"
    )
    found = _findings(bad, tmp_path)
    assert [int(f.split(":")[1].split()[0]) for f in found] == [1, *range(3, 13)], found


def test_jobs_yaml_is_plain_data():
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        assert "!!python" not in path.read_text(), path
        yaml.safe_load(path.read_text())


# ---------------------------------------------------------------- bind hosts


def _value_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_mlflow_server_binds_loopback_by_default():
    argv = mlflow_server.server_argv("sqlite:///x.db", "/tmp/a", 5000)
    assert _value_after(argv, "--host") == "127.0.0.1"
    assert (
        inspect.signature(mlflow_server.start_mlflow_server).parameters["host"].default
        == "127.0.0.1"
    )
    assert (
        _value_after(mlflow_server.server_argv("s", "a", 1, host="10.0.0.5"), "--host")
        == "10.0.0.5"
    )


def test_cluster_binds_loopback_with_auth_by_default(tmp_path):
    ports = {"gcs": 1, "dashboard": 2, "client_server": 3, "dashboard_agent": 4}
    argv = cluster.ray_head_argv("/bin", tmp_path, ports)
    assert _value_after(argv, "--dashboard-host") == "127.0.0.1"
    assert "--node-ip-address" not in argv  # loopback comes from connect.LOOPBACK_ENV (live:
    # test_cluster_ports.py, test_cluster.py::test_cluster_up_submit_down)
    params = inspect.signature(cluster.up).parameters
    assert params["host"].default == "127.0.0.1" and params["auth"].default is True
    args = build_parser(["cluster"]).parse_args(["cluster", "up"])
    assert args.host == "127.0.0.1" and not args.no_auth


def test_init_ray_dashboard_binds_loopback():
    """Static (starting Ray is heavy; `test_reliability_inputs` checks the live URL): every
    host `init_ray` names is loopback."""
    fn = ast.parse(inspect.getsource(connect.init_ray).lstrip())
    hosts = [
        v.value
        for node in ast.walk(fn)
        if isinstance(node, ast.Dict)
        for k, v in zip(node.keys, node.values)
        if isinstance(k, ast.Constant)
        and k.value == "dashboard_host"
        and isinstance(v, ast.Constant)
    ]
    binds = [
        n.args[0].elts[0].value
        for n in ast.walk(fn)
        if isinstance(n, ast.Call)
        and _dotted(n.func).endswith(".bind")
        and isinstance(n.args[0], ast.Tuple)
    ]
    assert hosts == ["127.0.0.1"] and set(binds) == {"127.0.0.1"}


def test_no_wildcard_bind_in_python_sources():
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in SOURCES
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "0.0.0.0" in line and "in (" not in line  # only comparisons may name it
    ]
    assert not hits, hits


# ---------------------------------------------------------------- refused at load time


class _RunsCode:
    """Unpickling this creates `path` (stands for any code a pickle can run)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": _RunsCode(marker)}, tmp_path / "ema.pt")
    with pytest.raises(CheckpointError, match="ema.pt"):
        load_ema(tmp_path, torch.nn.Linear(2, 2))
    assert not marker.exists()


def test_config_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:builtins.open ['{marker}', 'w']"
    job = tmp_path / "job.yaml"
    job.write_text(f"run:\n  name: {tag}\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: not valid YAML: .*python/object"):
        load_config(job)  # the safe loader refuses the tag; one line naming the file
    with pytest.raises(ConfigError, match=r"override .run\.name=.*python/object"):
        load_config(None, [f"run.name={tag}"])
    assert not marker.exists()
