"""Start-up and rendezvous scale: distrain launch (fast start) vs real torchrun, 2 to 16 local ranks.

    python bench/startup.py                      # sizes 2,4,8,16, 5 interleaved repetitions
    python bench/startup.py --sizes 2,4 --reps 7

Every run is a real command, timed from just before it starts (``time.time()``) to what each
rank stamps in bench/workers/first_step.py (the same file under both launchers, no distrain
import): **past the first barrier** (``init_process_group`` + ``barrier``, all ranks) and
**first optimizer step** of examples/digits_ddp.py, run unchanged after that (all ranks).
distrain and torchrun alternate within every repetition; each cell is the median. Goals:
first step <= 1.0 of torchrun at 2 ranks (issue 8); <= 0.5 at 4 ranks and <= 0.25 at 16
(issue 12); rendezvous <= 1.0 at every size. Steps/s after the start: bench/overhead.py
(fast start vs spawn).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python bench/startup.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    REPO,
    WORKERS,
    BenchError,
    distrain_cmd,
    goal_mark,
    load_note,
    median,
    run,
    table,
    torchrun_cmd,
)

SIZES = (2, 4, 8, 16)
EXAMPLE = REPO / "examples" / "digits_ddp.py"


def example_preload(nproc: int) -> str:
    """What the default ``--preload auto`` gives ``distrain launch examples/digits_ddp.py`` at
    ``nproc`` ranks: the worker runs the example through a wrapper (to stamp the first step),
    so the modules are named as launching the example directly would preload them."""
    from distrain.launchers.preload_scan import resolve_preload, usable_cores

    _, found = resolve_preload(("auto",), str(EXAMPLE), module=False, nproc=nproc, cores=usable_cores())
    return ",".join(dict.fromkeys(["torch", *found]))


FIRST_STEP_GOALS = {2: 1.0, 4: 0.5, 16: 0.25}  # distrain / torchrun, at most
WORKER = str(WORKERS / "first_step.py")


@dataclass(frozen=True, slots=True, kw_only=True)
class Start:
    barrier_s: float  # command -> every rank past its first barrier
    step_s: float  # command -> every rank past its first optimizer step
    total_s: float  # command -> exit


def launcher_cmd(launcher: str, nproc: int) -> list[str]:
    if launcher == "distrain":
        return distrain_cmd("--nproc-per-node", str(nproc), "--preload", example_preload(nproc))
    if launcher == "distrain-torch-only":
        return distrain_cmd("--nproc-per-node", str(nproc), "--preload", "torch")
    return torchrun_cmd("--nproc-per-node", str(nproc))


def start_once(launcher: str, nproc: int, root: Path, tag: str) -> Start:
    out = root / tag
    out.mkdir(parents=True)
    argv = [*launcher_cmd(launcher, nproc), WORKER, str(out), "digits", "--",
            "--max-steps", "1", "--epochs", "1", "--run-dir", str(out / "run")]
    done = run(argv, timeout=600).check()
    stamps = {}
    for what in ("barrier", "step"):
        found = [float(p.read_text()) for p in out.glob(f"{what}-rank*")]
        if len(found) != nproc:
            raise BenchError(f"{tag}: {len(found)} of {nproc} ranks stamped {what}\n{done.output[-2000:]}")
        stamps[what] = max(found) - done.started
    shutil.rmtree(out, ignore_errors=True)
    return Start(barrier_s=stamps["barrier"], step_s=stamps["step"], total_s=done.seconds)


def run_bench(reps: int = 5, *, sizes: Sequence[int] = SIZES, preload_side: bool = False) -> dict[str, Any]:
    """Interleaved repetitions over all sizes; prints both tables; returns the numbers.

    ``preload_side`` adds a third launcher: distrain preloading torch only (``--preload torch``).
    """
    launchers = ["distrain", "torchrun", *(["distrain-torch-only"] if preload_side else [])]
    root = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    note_before = load_note()
    runs: dict[tuple[str, int], list[Start]] = {}
    try:
        for rep in range(reps):
            for size in sizes:
                shift = (rep + size) % len(launchers)
                for launcher in launchers[shift:] + launchers[:shift]:
                    runs.setdefault((launcher, size), []).append(
                        start_once(launcher, size, root, f"{launcher}-{size}-{rep}"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    note = f"{note_before} before, {load_note()} after"
    results: dict[str, Any] = {"reps": reps, "load": note, "sizes": {}}
    step_rows, barrier_rows = [], []
    for size in sizes:
        ours, theirs = runs[("distrain", size)], runs[("torchrun", size)]
        step_ratio = median([a.step_s / b.step_s for a, b in zip(ours, theirs)])
        barrier_ratio = median([a.barrier_s / b.barrier_s for a, b in zip(ours, theirs)])
        goal = FIRST_STEP_GOALS.get(size)
        step_rows.append([size, median([s.step_s for s in ours]), median([s.step_s for s in theirs]),
                          step_ratio, goal_mark(step_ratio, goal, at_most=True) if goal else "-"])
        if preload_side:
            torch_only = runs[("distrain-torch-only", size)]
            torch_only_ratio = median([a.step_s / b.step_s for a, b in zip(torch_only, theirs)])
            step_rows[-1] += [median([s.step_s for s in torch_only]), torch_only_ratio]
            results["sizes"].setdefault(str(size), {})["torch_only"] = {
                "runs": [asdict(s) for s in torch_only], "first_step_ratio": round(torch_only_ratio, 3)}
        barrier_rows.append([size, median([s.barrier_s for s in ours]), median([s.barrier_s for s in theirs]),
                             barrier_ratio, goal_mark(barrier_ratio, 1.0, at_most=True)])
        results["sizes"].setdefault(str(size), {}).update({
            "distrain": [asdict(s) for s in ours], "torchrun": [asdict(s) for s in theirs],
            "first_step_ratio": round(step_ratio, 3), "barrier_ratio": round(barrier_ratio, 3),
        })
    print(table(f"Start-up: command -> first optimizer step of examples/digits_ddp.py, seconds, median of "
                f"{reps} ({note})",
                ["ranks", "distrain", "torchrun", "distrain/torchrun", "goal",
                 *(["torch only", "torch only/torchrun"] if preload_side else [])], step_rows),
          flush=True)
    print(growth("first step", sizes, step_rows), flush=True)
    print(table(f"Rendezvous scale: command -> all ranks past the first barrier, seconds, median of {reps}",
                ["ranks", "distrain", "torchrun", "distrain/torchrun", "goal"], barrier_rows), flush=True)
    print(growth("first barrier", sizes, barrier_rows), flush=True)
    return results


def growth(what: str, sizes: Sequence[int], rows: Sequence[Sequence[Any]]) -> str:
    """How the time grows with the rank count, relative to the smallest size."""
    if len(rows) < 2:
        return ""
    parts = []
    for column, name in ((1, "distrain"), (2, "torchrun")):
        base = rows[0][column]
        steps = ", ".join(f"{size}: x{row[column] / base:.1f}" for size, row in zip(sizes, rows))
        per_rank = (rows[-1][column] - base) / (sizes[-1] - sizes[0])
        parts.append(f"  {name:<9} {steps}  (+{per_rank:.2f} s per extra rank)")
    return f"growth of {what} with ranks:\n" + "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per launcher and size (median)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="local rank counts")
    parser.add_argument("--preload-side", action="store_true",
                        help="also time distrain --preload torch (the example's imports not preloaded)")
    args = parser.parse_args(argv)
    run_bench(args.reps, sizes=[int(s) for s in args.sizes.split(",")], preload_side=args.preload_side)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
