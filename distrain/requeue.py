"""``distrain requeue``: put a preempted SLURM job back in the queue, a bounded number of times.

The other half of :mod:`distrain.preemption`: SIGTERM made every rank save and exit; the sbatch
script then runs ``distrain requeue --max N``, which calls ``scontrol requeue $SLURM_JOB_ID``
unless the job already restarted N times (``SLURM_RESTART_COUNT``). The requeued job keeps its id,
starts the same script again, and the training script resumes from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from distrain.errors import ConfigError

EXIT_NOT_REQUEUED = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class RequeueDecision:
    job_id: str
    restarts: int
    max_requeues: int

    @property
    def requeue(self) -> bool:
        return self.restarts < self.max_requeues


def decide(environ: Mapping[str, str], max_requeues: int) -> RequeueDecision:
    """Whether this job may be requeued once more; ConfigError outside a SLURM batch job."""
    job_id = environ.get("SLURM_JOB_ID", "")
    if not job_id:
        raise ConfigError("SLURM_JOB_ID", None, "a SLURM job", "run distrain requeue in an sbatch script")
    if max_requeues < 0:
        raise ConfigError("--max", max_requeues, ">= 0", "e.g. --max 3")
    restarts_text = environ.get("SLURM_RESTART_COUNT", "0") or "0"
    if not restarts_text.isdigit():
        raise ConfigError("SLURM_RESTART_COUNT", restarts_text, "a count", "let SLURM set it")
    return RequeueDecision(job_id=job_id, restarts=int(restarts_text), max_requeues=max_requeues)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="distrain requeue", description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=3, dest="max_requeues",
                        help="requeue at most this many times in all (default 3)")
    args = parser.parse_args(list(argv))
    decision = decide(os.environ, args.max_requeues)
    if not decision.requeue:
        print(f"distrain requeue: job {decision.job_id} not requeued: it already restarted "
              f"{decision.restarts} times (--max {decision.max_requeues})", file=sys.stderr, flush=True)
        return EXIT_NOT_REQUEUED
    # SLURM ends the job's processes (this one too) with SIGTERM as soon as the requeue is
    # accepted: ignore it long enough to report the requeue and exit on our own.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    result = subprocess.run(["scontrol", "requeue", decision.job_id], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        print(f"distrain requeue: scontrol requeue {decision.job_id} failed: "
              f"{(result.stderr or result.stdout).strip()}", file=sys.stderr, flush=True)
        return EXIT_NOT_REQUEUED
    print(f"distrain requeue: job {decision.job_id} requeued (restart {decision.restarts + 1} of "
          f"{decision.max_requeues})", flush=True)
    return 0
