"""``make bench``: every benchmark, its table printed, all numbers in bench/results.json.

    python bench/run_all.py                    # the full set, median of 5 (about 50 min idle, 2 cores)
    python bench/run_all.py --quick            # a fast pass: 3 repetitions, 2 and 4 ranks, 3 fault trials
    python bench/run_all.py --only startup,ckpt --reps 7

Sections (each also runs alone, see its file): ``overhead`` (steps/s vs a hand-written loop under
torchrun), ``start_methods`` (fast start vs spawn: 15 launch pairs taking turns), ``startup`` (first step and
first barrier, 2-16 ranks, vs torchrun), ``ray`` (start-up vs Ray Train's TorchTrainer), ``ckpt``
(async save stall and training time lost vs a blocking save, write throughput vs dd),
``ckpt_s3`` (S3 upload throughput vs s3fs, async stall on S3), ``faults`` (kill-anywhere trials,
preemption, hang), ``snapshots`` (in-memory snapshots: step time, recovery vs torchrun,
snapshot fault trials) and, when bench/sharded_memory.py is present, ``sharded`` (checkpoint memory,
sharded vs full). A section that fails is reported and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python bench/run_all.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import (
    ckpt_s3,
    ckpt_stall,
    fault_trials,
    overhead,
    readme,
    snapshots,
    start_methods,
    startup,
    startup_ray,
)
from bench.common import REPO, load_note, machine

SECTIONS = ("overhead", "start_methods", "startup", "ray", "ckpt", "ckpt_s3", "faults", "snapshots",
            "sharded")


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What one ``run_all`` does: repetitions and sizes, smaller with ``--quick``."""

    reps: int
    sizes: tuple[int, ...]
    overhead_scale: float
    start_pairs: int
    fault_trials: int
    sharded_mb: int
    sharded_ranks: tuple[int, ...]


def plan_for(quick: bool, reps: int | None, fault_trials: int | None) -> Plan:
    if quick:
        base = Plan(reps=3, sizes=(2, 4), overhead_scale=0.5, start_pairs=5, fault_trials=3, sharded_mb=64,
                    sharded_ranks=(2,))
    else:
        base = Plan(reps=5, sizes=startup.SIZES, overhead_scale=1.0, start_pairs=start_methods.PAIRS,
                    fault_trials=20, sharded_mb=640, sharded_ranks=(2, 4))
    return Plan(reps=reps or base.reps, sizes=base.sizes, overhead_scale=base.overhead_scale,
                start_pairs=base.start_pairs,
                fault_trials=base.fault_trials if fault_trials is None else fault_trials,
                sharded_mb=base.sharded_mb, sharded_ranks=base.sharded_ranks)


def sharded_runner(plan: Plan) -> Callable[[], Any] | None:
    """bench/sharded_memory.py's ``run()`` when that module exists (written by another change)."""
    if importlib.util.find_spec("bench.sharded_memory") is None:
        return None
    from bench import sharded_memory  # type: ignore[attr-defined]

    return lambda: sharded_memory.run(mb=plan.sharded_mb, ranks=plan.sharded_ranks)


def sections(plan: Plan) -> dict[str, Callable[[], Any]]:
    table: dict[str, Callable[[], Any]] = {
        "overhead": lambda: overhead.run_bench(plan.reps, scale=plan.overhead_scale),
        "start_methods": lambda: start_methods.run_bench(pairs=plan.start_pairs),
        "startup": lambda: startup.run_bench(plan.reps, sizes=plan.sizes),
        "ray": lambda: startup_ray.run_bench(plan.reps),
        "ckpt": lambda: ckpt_stall.run_bench(plan.reps),
        "ckpt_s3": lambda: ckpt_s3.run_bench(plan.reps),
        "faults": lambda: fault_trials.run(plan.fault_trials),
        "snapshots": lambda: snapshots.run_bench(pairs=6 if plan.fault_trials < 20 else 20,
                                                 reps=1 if plan.fault_trials < 20 else 3,
                                                 trials=plan.fault_trials,
                                                 goodput_seconds=0 if plan.fault_trials < 20 else 180),
    }
    sharded = sharded_runner(plan)
    if sharded is not None:
        table["sharded"] = sharded
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repetitions, 2 and 4 ranks, 3 fault trials")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per side (median; default 5)")
    parser.add_argument("--fault-trials", type=int, default=None, help="default 20 (3 with --quick)")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--readme", default=str(REPO / "bench" / "README.md"),
                        help="whose latest-run block to rewrite from --out ('' to leave it)")
    args = parser.parse_args(argv)
    chosen = [s for s in filter(None, args.only.split(","))] or list(SECTIONS)
    unknown = sorted(set(chosen + args.skip.split(",")) - set(SECTIONS) - {""})
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; expected some of {', '.join(SECTIONS)}")
    plan = plan_for(args.quick, args.reps, args.fault_trials)
    available = sections(plan)
    todo = [s for s in chosen if s in available and s not in args.skip.split(",")]

    report: dict[str, Any] = {
        "machine": machine(), "command": " ".join(["python", "bench/run_all.py", *(argv or sys.argv[1:])]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "load_at_start": load_note(),
        "plan": {"reps": plan.reps, "sizes": plan.sizes, "fault_trials": plan.fault_trials,
                 "quick": args.quick}, "results": {}, "tables": {}, "seconds": {}, "errors": {},
    }
    print(f"bench: {report['machine']}; {report['load_at_start']}; sections {', '.join(todo)}", flush=True)
    for name in todo:
        print(f"\n== {name} ==", flush=True)
        start = time.monotonic()
        printed = readme.Tee(sys.stdout)
        try:
            with contextlib.redirect_stdout(printed):
                report["results"][name] = available[name]()
        except Exception as error:  # one broken section must not hide the others' numbers
            traceback.print_exc()
            report["errors"][name] = f"{type(error).__name__}: {str(error)[:2000]}"
        report["tables"][name] = readme.tables_in(printed.text())
        report["seconds"][name] = round(time.monotonic() - start, 1)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")  # partial results survive
    report["load_at_end"] = load_note()
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.readme:
        readme.write(args.out, Path(args.readme))
        print(f"bench: {args.readme}'s latest-run block rewritten from {args.out}", flush=True)
    total = sum(report["seconds"].values())
    print(f"\nbench: {len(todo) - len(report['errors'])}/{len(todo)} sections ran in {total / 60:.1f} min; "
          f"results in {args.out}", flush=True)
    if report["errors"]:
        print(f"bench: failed: {', '.join(report['errors'])}", file=sys.stderr)
    faults = report["results"].get("faults")
    if faults and faults["identical"] != faults["total"]:
        return 1
    snaps = report["results"].get("snapshots")
    if snaps and "trials" in snaps and snaps["trials"]["identical"] != snaps["trials"]["total"]:
        return 1
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
