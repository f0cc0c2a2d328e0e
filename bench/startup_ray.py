"""Start-up on Ray: ``distrain`` (``--launcher ray`` / ``run(..., launcher="ray")``) vs Ray Train.

    python bench/startup_ray.py              # 5 interleaved repetitions of each side

Both sides are a fresh command (bench/workers/ray_first_step.py) that starts the same local
Ray, then runs the same function on 2 workers: process group, the digits CNN under DDP, one
optimizer step. Timed from just before the command starts to the last rank's stamp after its
first step; sides alternate; the ratio is the median of per-repetition ratios. Goal: <= 0.8.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python bench/startup_ray.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    PYTHON,
    WORKERS,
    BenchError,
    Running,
    goal_mark,
    interleave,
    load_note,
    median,
    session_leftovers,
    table,
)

GOAL = 0.8
SIDES = {"distrain": "distrain (launcher ray)", "ray-train": "Ray Train TorchTrainer"}


def first_step_once(side: str, root: Path, counter: list[int]) -> float:
    counter.append(1)
    out = root / f"{side}-{len(counter)}"
    out.mkdir()
    running = Running([PYTHON, str(WORKERS / "ray_first_step.py"), side, str(out)])
    done = running.wait(600).check()
    left = session_leftovers(running.pid, grace=20)
    if left:
        running.kill()
        raise BenchError(f"{side}: processes left after the command: {left}")
    stamps = [float(p.read_text()) for p in out.glob("step-rank*")]
    if len(stamps) != 2:
        raise BenchError(f"{side}: {len(stamps)} of 2 ranks stamped their step\n{done.output[-2000:]}")
    return max(stamps) - done.started


def run_bench(reps: int = 5) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-ray-startup-"))
    note_before = load_note()
    counter: list[int] = []
    try:
        times = interleave(reps, {side: functools.partial(first_step_once, side, root, counter)
                                  for side in SIDES})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = median([a / b for a, b in zip(times["distrain"], times["ray-train"])])
    note = f"{note_before} before, {load_note()} after"
    print(table(f"Start-up on Ray: command -> first optimizer step on 2 workers, seconds, median of {reps} "
                f"({note})",
                ["distrain (launcher ray)", "Ray Train TorchTrainer", "ratio", "goal"],
                [[median(times["distrain"]), median(times["ray-train"]), ratio,
                  goal_mark(ratio, GOAL, at_most=True)]]), flush=True)
    return {"reps": reps, "load": note, "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
            "ratio": round(ratio, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    run_bench(args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
