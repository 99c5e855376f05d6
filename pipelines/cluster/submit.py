"""`vqtok submit -- vqtok train jobs/demo.yaml ...`: run a command as a Ray job on a cluster and
follow its log, with two lines of the client's own.

    export RAY_ADDRESS=http://HEAD:8265 RAY_AUTH_MODE=token     # as `vqtok cluster up` prints
    vqtok submit -- vqtok train jobs/demo.yaml train.steps=20

It does what `ray job submit --working-dir . -- ...` does, through Ray's `JobSubmissionClient`:
the working directory is uploaded with Ray's rules (its default excludes, `.gitignore` and
`.rayignore`), the job runs, its output is streamed. Ray's CLI also prints its packaging steps
(a line per ignore file it reads, three passes), "Next steps" and banners: 33 of the 50
lines around a 20-step demo job here. This prints the job id with the commands to follow or
stop it, the job's own output and its end status; the exit status is 0 only if it succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
from pathlib import Path

from pipelines.cluster.connect import verbose

EXAMPLE = """example:
  vqtok cluster up                      # prints the two variables to export
  export RAY_ADDRESS=http://127.0.0.1:PORT RAY_AUTH_MODE=token
  vqtok submit -- vqtok train jobs/demo.yaml train.steps=20 run.storage=/abs/runs

Paths inside the command are read on the cluster: give shards and run.storage as absolute
paths or URIs. `ray job logs|status|stop ID` work on the job as on any other."""


class SubmitError(RuntimeError):
    """A submission the user can fix (no address, no command, no such folder)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLE
    p.add_argument("--address", default=None,
                   help="the cluster's job server (default: $RAY_ADDRESS)")  # fmt: skip
    p.add_argument("--working-dir", type=Path, default=Path("."),
                   help="folder uploaded as the job's working directory (default: this one)")  # fmt: skip
    p.add_argument("--submission-id", default=None, help="the job's id (default: Ray picks one)")
    p.add_argument("--no-wait", action="store_true", help="submit and return (then: ray job logs -f ID)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="after --: the command the job runs (required)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SubmitError("no command: vqtok submit -- vqtok train jobs/demo.yaml ...")
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster: set RAY_ADDRESS (`vqtok cluster up` prints it) "
                          "or pass --address http://HEAD:8265")  # fmt: skip
    workdir = args.working_dir.expanduser().resolve()
    if not workdir.is_dir():
        raise SubmitError(f"--working-dir {workdir}: no such folder")
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not verbose():  # the client's packaging and websocket lines; its errors still print
        for name in ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk",
                     "ray.dashboard.modules.job.sdk"):  # fmt: skip
            logging.getLogger(name).setLevel(logging.ERROR)
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=shlex.join(command), submission_id=args.submission_id,
                               runtime_env={"working_dir": str(workdir)})  # fmt: skip
    print(f"[vqtok] job {job_id} on {address}  (follow: ray job logs -f {job_id}; "
          f"stop: ray job stop {job_id})", file=sys.stderr, flush=True)  # fmt: skip
    if args.no_wait:
        return 0
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        print(f"\n[vqtok] stopped following; the job runs on (ray job stop {job_id})",
              file=sys.stderr)  # fmt: skip
        return 130
    status = client.get_job_status(job_id)
    print(f"[vqtok] job {job_id}: {status.value}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
