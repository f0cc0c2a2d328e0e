"""Overhead: training steps/s under distrain vs a hand-written DDP loop under torchrun.

    python bench/overhead.py                # 5 interleaved rounds, a 120-pair paired table
    python bench/overhead.py --quick        # 3 rounds at half the steps, a 30-pair paired table
    python bench/overhead.py --reps 7 --scale 0.5

Two sides, each a real 2-rank launch, each timing the same steps of the same workloads
(bench/workers/workloads.py: the digits CNN, and a 2.9 M-parameter MLP) after a warm-up:

* ``distrain``: ``distrain launch`` (fast start, the default) of a loop using ``ddp.wrap``,
  ``build_loader``, ``TBLogger`` + ``train_scalars`` every 10 steps and ``StepTimer``;
* ``torchrun``: real ``torchrun`` of a hand-written loop (``init_process_group``, DDP,
  ``DistributedSampler``, tensorboardX on rank 0).

Ratios are medians over repetitions of per-repetition ratios (interleaved, so a load spike on
this shared machine hits neighbouring runs alike). Goal: distrain / torchrun >= 0.99. Fast start
vs spawn has its own benchmark, bench/start_methods.py.

Separate launches cannot resolve 1 % here: the same command's speed varies by +-15 % from
launch to launch on this VM. So a second table, **paired**, runs both loops in one 2-rank
launch (torchrun), alternating chunks of steps (bench/workers/overhead_paired.py): the median
of the per-pair ratios with a distribution-free 95 % interval for that median. It measures
what distrain's library costs per step (wrap, loader, step timer, TensorBoard scalars) with the
process-to-process variation removed; the launcher itself adds nothing per step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python bench/overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    WORKERS,
    distrain_cmd,
    goal_mark,
    load_note,
    median,
    median_interval,
    run,
    table,
    torchrun_cmd,
)

WORKLOADS = ("digits", "mlp")
GOAL = 0.99
PAIRS = 120


def side_commands(out: Path, scale: float) -> dict[str, Callable[[], dict[str, Any]]]:
    """name -> a function running that side once and returning {workload: steps/s}."""
    distrain_worker = str(WORKERS / "overhead_distrain.py")
    plain_worker = str(WORKERS / "overhead_plain.py")
    counter = {"n": 0}

    def runner(argv_of: Callable[[Path], list[str]]) -> Callable[[], dict[str, Any]]:
        def once() -> dict[str, Any]:
            counter["n"] += 1
            result = out / f"run{counter['n']}.json"
            run(argv_of(result), timeout=600).check()
            rates: dict[str, Any] = json.loads(result.read_text())
            return rates

        return once

    worker_args = ("--scale", str(scale))
    return {
        "distrain": runner(lambda r: distrain_cmd("--nproc-per-node", "2", distrain_worker, "--out", str(r),
                                                  *worker_args)),
        "torchrun": runner(lambda r: torchrun_cmd("--nproc-per-node", "2", plain_worker, "--out", str(r),
                                                  *worker_args)),
    }


def rounds(reps: int, sides: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, list[Any]]:
    """``reps`` interleaved rounds of every side; the order rotates so no side always runs first."""
    results: dict[str, list[Any]] = {name: [] for name in sides}
    names = list(sides)
    for index in range(reps):
        for name in names[index % len(names):] + names[:index % len(names)]:
            results[name].append(sides[name]())
    return results


def run_bench(reps: int = 5, *, scale: float = 1.0, paired_pairs: int | None = None) -> dict[str, Any]:
    """Measure; print the tables; return the numbers."""
    out = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    note_before = load_note()
    try:
        raw = rounds(reps, side_commands(out, scale))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows, results = [], {}
    for workload in WORKLOADS:
        rate = {name: [r[workload] for r in runs] for name, runs in raw.items()}
        vs_torchrun = median([d / t for d, t in zip(rate["distrain"], rate["torchrun"])])
        results[workload] = {"steps_per_s": {k: [round(x, 2) for x in v] for k, v in rate.items()},
                             "ratio_vs_torchrun": round(vs_torchrun, 3)}
        rows.append([workload, median(rate["distrain"]), median(rate["torchrun"]), vs_torchrun,
                     goal_mark(vs_torchrun, GOAL, at_most=False)])
    note = f"{note_before} before, {load_note()} after"
    print(table(f"Overhead: steps/s, 2 ranks, median of {reps} interleaved repetitions ({note})",
                ["workload", "distrain", "torchrun loop", "distrain/torchrun", "goal"], rows), flush=True)
    paired = run_paired(pairs=paired_pairs or max(10, round(PAIRS * scale)))
    return {"reps": reps, "scale": scale, "load": note, "workloads": results, "paired": paired}


def run_paired(*, pairs: int) -> dict[str, Any]:
    """Both loops in one launch, alternating chunks: the per-step cost of distrain's library."""
    out = Path(tempfile.mkdtemp(prefix="bench-paired-"))
    note_before = load_note()
    try:
        result = out / "paired.json"
        run(torchrun_cmd("--nproc-per-node", "2", str(WORKERS / "overhead_paired.py"), "--out",
                         str(result), "--pairs", str(pairs)), timeout=900).check()
        seconds: dict[str, list[list[float]]] = json.loads(result.read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows, results = [], {}
    for workload, chunks in seconds.items():
        ratios = [plain / distrain for distrain, plain in chunks]  # steps/s ratio: time inverted
        middle = median(ratios)
        low, high = median_interval(ratios)
        results[workload] = {"ratios": [round(r, 3) for r in ratios], "median": round(middle, 3),
                             "interval_95": [round(low, 3), round(high, 3)]}
        rows.append([workload, len(ratios), middle, f"{low:.3f} to {high:.3f}",
                     goal_mark(middle, GOAL, at_most=False)])
    note = f"{note_before} before, {load_note()} after"
    print(table(f"Overhead, paired: distrain loop / hand-written loop, steps/s, same 2 processes, "
                f"alternating chunks ({note})",
                ["workload", "pairs", "median ratio", "95 % interval", "goal"], rows), flush=True)
    return {"pairs": pairs, "load": note, "workloads": results}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="rounds with the torchrun side (median)")
    parser.add_argument("--scale", type=float, default=None, help="fraction of the timed steps")
    parser.add_argument("--quick", action="store_true",
                        help="3 torchrun rounds, half the steps, a 30-pair paired table")
    args = parser.parse_args(argv)
    if args.quick:
        run_bench(3, scale=args.scale or 0.5, paired_pairs=30)
    else:
        run_bench(args.reps, scale=args.scale or 1.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
