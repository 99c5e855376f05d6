"""`vqtok` command line: a few verbs, settings in config files.

Each verb lives in the module that does its work; this file only wires argparse to them.
A verb module exposes `add_arguments(parser)` and `run(args) -> int`.

Errors a user causes (a bad config file or override, a missing or unsafe checkpoint, a model
that does not load) end as one line on stderr naming what was wrong, exit 2 for usage and 1
for a run that failed; `--debug`, anywhere on the line, shows the traceback instead.
Ray, DeepSpeed and torch are quiet by default (their INFO lines and deprecation warnings);
`--verbose`, anywhere on the line, lets them speak.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# verb -> (module, one-line help). Modules are imported lazily, so `vqtok --help` is fast
# and a verb's heavy imports (ray, deepspeed, mlflow) are paid only when it runs.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.demo", "demo data -> train a small PVQ-VAE on local Ray -> eval -> MLflow"),
    "quantizers": ("pipelines.studies.quantizer_table", "fit every quantizer to image patches; a table"),
    "demo-data": ("pipelines.data.demo_data", "write the small offline demo data set as shards"),
    "shards": ("pipelines.data.shards", "write WebDataset shards from videos and images"),
    "inspect": ("pipelines.data.inspect", "read shards through the training decode path; print JSON"),
    "train": (
        "pipelines.training.launch",
        "train a tokenizer from a jobs/*.yaml config (Ray Train or --local)",
    ),
    "eval": ("pipelines.inference.eval_job", "evaluate a model on shards (Ray Data actors): metrics, grids"),
    "tokenize": ("pipelines.inference.tokenize", "shards -> token shards with a trained model (Ray Data)"),
    "detokenize": ("pipelines.inference.tokenize", "token shards -> videos/images, to check by eye"),
    "tune": (
        "pipelines.studies.tune",
        "search hyperparameters with Ray Tune (tune: section; ASHA, MLflow)",
    ),
    "ablate": ("pipelines.studies.ablation", "train one config with several quantizers; a results table"),
    "cluster": ("pipelines.cluster.local", "a local Ray head + MLflow server for `ray job submit`"),
    "submit": ("pipelines.cluster.submit", "run a command as a Ray job on a cluster; follow its log"),
}


def build_parser(verbs: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqtok", description=__doc__.splitlines()[0],
        epilog="anywhere on the line: --debug (tracebacks), --verbose (Ray, DeepSpeed and torch "
               "logs)")  # fmt: skip
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in verbs or VERBS:
        module, help_text = VERBS[verb]
        importlib.import_module(module).add_arguments(sub.add_parser(verb, help=help_text))
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The verb's arguments. `key=value` overrides may come anywhere, before or after the
    options (`vqtok train job.yaml --local train.steps=3`): argparse's subcommands stop the
    positional list at the first option, so the ones after it are collected here."""
    # Build only the chosen verb's parser: one verb's optional import cannot break another.
    chosen = [a for a in argv if a in VERBS][:1]
    parser = build_parser(chosen or None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        if len(overrides) < len(extra) or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *overrides]
    return args


# exception class name -> exit code: the errors a user causes (see the module doc)
USER_ERRORS = {"ConfigError": 2, "CheckpointError": 1, "ModelLoadError": 1, "ClusterError": 1,
               "NonFiniteLossError": 1, "SubmitError": 2}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # past it: `vqtok submit`'s command
    argv, command = argv[:cut], argv[cut:]
    debug = "--debug" in argv
    if "--verbose" in argv:  # Ray, DeepSpeed and torch lines kept (pipelines.cluster.connect)
        os.environ["VQTOK_VERBOSE"] = "1"
    else:
        from pipelines.tracking.progress import one_line_warnings

        one_line_warnings()
    args = parse([a for a in argv if a not in ("--debug", "--verbose")] + command)
    try:
        return int(importlib.import_module(VERBS[args.verb][0]).run(args) or 0)
    except Exception as exc:
        found = _user_error(exc)
        if debug or found is None:
            raise
        cause, code = found
        message = " ".join(str(cause).split())
        print(f"vqtok {args.verb}: {message} (--debug for the traceback)", file=sys.stderr)
        return code


def _user_error(exc: BaseException, depth: int = 0) -> tuple[BaseException, int] | None:
    """The user error in `exc`, itself or what it wraps, and its exit code: raised in a Ray
    Train worker, it reaches the driver inside Ray's `WorkerGroupError.worker_failures`, each
    a `RayTaskError` whose `.cause` is the original (the one whose message is printed)."""
    if depth > 4:
        return None
    for c in type(exc).__mro__:
        if c.__name__ in USER_ERRORS:
            return getattr(exc, "cause", None) or exc, USER_ERRORS[c.__name__]
    failures = getattr(exc, "worker_failures", None)
    inner = [*(failures.values() if isinstance(failures, dict) else ()),
             getattr(exc, "controller_failure", None), getattr(exc, "cause", None),
             exc.__cause__]  # fmt: skip
    for e in inner:
        if isinstance(e, BaseException) and (found := _user_error(e, depth + 1)):
            return found
    return None


if __name__ == "__main__":
    raise SystemExit(main())
