"""Forked vs spawned workers: training steps/s of launch pairs that take turns on the machine.

    python bench/start_methods.py                   # 15 launch pairs, digits and MLP
    python bench/start_methods.py --pairs 4 --turns 6

Each launch pair is a fast-start launch (``--start-method forkserver``, the default) and a
``--start-method spawn`` launch of the same plain 2-rank DDP loop
(bench/workers/start_method_turns.py), started at once. After both warm up, they train in turns
of 0.25-0.5 s (``--turns`` turn pairs per workload, the order flipped every pair) while the other
waits in a blocking read, using no CPU. This VM's speed drifts within seconds, so launches run
one after the other compare moments as much as start methods (docs/performance.md); turns cancel
the drift, and fifteen launch pairs keep what differs from process to process (memory layout,
which pages were inherited) in the figure.

Per launch pair: forked steps/s over spawned steps/s of all its turns. Goal: the median over the
pairs >= 0.99 and the lower end of its distribution-free 95 % interval >= 0.98.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python bench/start_methods.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import WORKERS, bench_env, distrain_cmd, load_note, median, median_interval, table

METHODS = ("forkserver", "spawn")
CHUNKS = {"digits": 60, "mlp": 8}  # steps per turn: 0.25-0.5 s each on this VM
RANKS = 2
GOAL = 0.99
LOW_GOAL = 0.98
PAIRS = 15
TURNS = 32
TIMEOUT_S = 600


class Turns:
    """The driver's ends of one launch pair's FIFOs, and the launches themselves."""

    def __init__(self, sync: Path, procs: dict[str, subprocess.Popen[str]]) -> None:
        self.procs = procs
        self.go: dict[tuple[str, int], int] = {}
        self.done: dict[tuple[str, int], int] = {}
        for method in METHODS:
            for rank in range(RANKS):
                # Read-write: the driver's own open never blocks, nor does the worker's.
                self.go[method, rank] = os.open(sync / f"go-{method}-{rank}", os.O_RDWR)
                self.done[method, rank] = os.open(sync / f"done-{method}-{rank}", os.O_RDWR)

    def send(self, methods: Sequence[str], byte: bytes) -> None:
        for method in methods:
            for rank in range(RANKS):
                os.write(self.go[method, rank], byte)

    def expect(self, methods: Sequence[str], byte: bytes) -> None:
        """One ``byte`` from every rank of ``methods``; a side that exits or stalls raises."""
        deadline = time.monotonic() + TIMEOUT_S
        for method in methods:
            for rank in range(RANKS):
                fd = self.done[method, rank]
                while not select.select([fd], [], [], 0.5)[0]:
                    failed = [m for m, p in self.procs.items() if p.poll() is not None]
                    if failed or time.monotonic() > deadline:
                        raise RuntimeError(f"the {', '.join(failed) or method} side "
                                           f"{'exited' if failed else 'stalled'} before its turn ended")
                got = os.read(fd, 1)
                if got != byte:
                    raise RuntimeError(f"{method} rank {rank} sent {got!r}, expected {byte!r}")

    def close(self) -> None:
        for fd in [*self.go.values(), *self.done.values()]:
            os.close(fd)


def launch_pair(index: int, workloads: Sequence[str], turns: int) -> dict[str, dict[str, list[list[float]]]]:
    """One launch pair; returns {method: {workload: [[wall_s, cpu_s] per turn]}}."""
    sync = Path(tempfile.mkdtemp(prefix="bench-start-methods-"))
    for method in METHODS:
        for rank in range(RANKS):
            os.mkfifo(sync / f"go-{method}-{rank}")
            os.mkfifo(sync / f"done-{method}-{rank}")
    chunks = ",".join(f"{name}={CHUNKS[name]}" for name in workloads)
    procs: dict[str, subprocess.Popen[str]] = {}
    fifos: Turns | None = None
    try:
        for method in METHODS if index % 2 == 0 else METHODS[::-1]:  # who starts first alternates
            argv = distrain_cmd("--nproc-per-node", str(RANKS), "--start-method", method,
                                str(WORKERS / "start_method_turns.py"), "--sync", str(sync), "--job", method,
                                "--workloads", ",".join(workloads), "--chunks", chunks)
            procs[method] = subprocess.Popen(argv, env=bench_env(), stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        fifos = Turns(sync, procs)
        for _ in workloads:
            fifos.expect(METHODS, b"r")
            for turn in range(turns):
                for method in METHODS if (index + turn) % 2 == 0 else METHODS[::-1]:
                    fifos.send([method], b"g")
                    fifos.expect([method], b"d")
            fifos.send(METHODS, b"n")
        for method, proc in procs.items():
            _, err = proc.communicate(timeout=TIMEOUT_S)
            if proc.returncode != 0:
                raise RuntimeError(f"the {method} side failed (exit {proc.returncode}):\n{err[-3000:]}")
        return {m: json.loads((sync / f"result-{m}.json").read_text()) for m in METHODS}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        if fifos is not None:
            fifos.close()
        shutil.rmtree(sync, ignore_errors=True)


def run_bench(*, pairs: int = PAIRS, turns: int = TURNS,
              workloads: Sequence[str] = tuple(CHUNKS)) -> dict[str, Any]:
    """Measure; print the table; return the numbers."""
    note_before = load_note()
    raw = []
    for index in range(pairs):
        raw.append(launch_pair(index, workloads, turns))
        print(f"launch pair {index + 1}/{pairs}: " + ", ".join(
            f"{name} {ratio_of(raw[-1], name, 0):.3f}" for name in workloads), flush=True)
    note = f"{note_before}; after: {load_note()}"
    rows, results = [], {}
    for name in workloads:
        ratios = [ratio_of(pair, name, 0) for pair in raw]
        cpu_ratios = [ratio_of(pair, name, 1) for pair in raw]
        low, high = median_interval(ratios)
        middle = median(ratios)
        rates = {m: median([CHUNKS[name] * len(p[m][name]) / sum(t[0] for t in p[m][name]) for p in raw])
                 for m in METHODS}
        cpu_ms = {m: median([1000 * sum(t[1] for t in p[m][name]) / (CHUNKS[name] * len(p[m][name]))
                             for p in raw]) for m in METHODS}
        met = middle >= GOAL and low >= LOW_GOAL
        faster = sum(r > 1 for r in ratios)
        results[name] = {"ratios": [round(r, 4) for r in ratios], "median": round(middle, 4),
                         "interval_95": [round(low, 4), round(high, 4)],
                         "cpu_ratios": [round(r, 4) for r in cpu_ratios],
                         "steps_per_s": {m: round(r, 2) for m, r in rates.items()},
                         "cpu_ms_per_step": {m: round(c, 3) for m, c in cpu_ms.items()},
                         "forked_faster": faster}
        rows.append([name, len(ratios), rates["forkserver"], rates["spawn"], middle,
                     f"{low:.3f} to {high:.3f}",
                     f"{'met' if met else 'MISSED'} (>= {GOAL:g}, low end >= {LOW_GOAL:g})",
                     f"{faster}/{len(ratios)}",
                     f"{cpu_ms['forkserver']:.2f} / {cpu_ms['spawn']:.2f}", median(cpu_ratios)])
    print(table(f"Fast start vs spawn: steps/s of 2-rank launch pairs taking turns ({turns} turn pairs "
                f"per workload each), median of per-pair ratios, 95 % interval ({note})",
                ["workload", "launch pairs", "forked", "spawned", "forked/spawned", "95 % interval", "goal",
                 "forked faster", "CPU ms/step (forked / spawned)", "CPU per step, spawned/forked"],
                rows), flush=True)
    return {"pairs": pairs, "turns": turns, "chunks": {n: CHUNKS[n] for n in workloads}, "load": note,
            "workloads": results}


def ratio_of(pair: dict[str, dict[str, list[list[float]]]], workload: str, column: int) -> float:
    """Forked over spawned steps/s (spawned over forked seconds) of one launch pair's turns;
    ``column`` 0: wall time, 1: CPU time (spawned CPU per step over forked: above 1, forked cheaper)."""
    seconds = {m: sum(turn[column] for turn in pair[m][workload]) for m in METHODS}
    return seconds["spawn"] / seconds["forkserver"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=PAIRS, help="launch pairs")
    parser.add_argument("--turns", type=int, default=TURNS, help="turn pairs per workload per launch pair")
    parser.add_argument("--workloads", default=",".join(CHUNKS))
    args = parser.parse_args(argv)
    workloads = args.workloads.split(",")
    unknown = sorted(set(workloads) - set(CHUNKS))
    if unknown:
        parser.error(f"--workloads {args.workloads}: unknown {', '.join(unknown)}; expected some of "
                     f"{', '.join(CHUNKS)}")
    if args.pairs < 1 or args.turns < 1:
        parser.error(f"--pairs {args.pairs} --turns {args.turns}: both must be at least 1")
    run_bench(pairs=args.pairs, turns=args.turns, workloads=workloads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
