"""Forked vs spawned workers measured at the same moments: two 2-rank launches at once.

    python bench/start_methods.py                 # 12 pairs each of digits and MLP
    python bench/start_methods.py --pairs 4 --workloads digits

This machine's speed drifts within seconds (one process, one model, consecutive 1 s windows:
204-328 digits steps/s, CPU per step following), so separate launches compare moments as much as
start methods. Here a fast-start launch and a ``--start-method spawn`` launch of the same plain
DDP loop (bench/workers/start_method_window.py) warm up, then count their steps in one shared
wall-clock window: rank r of both on core r (``--cpu-affinity auto``), the launch order
alternating. Prints each pair and the median of forked/spawned with a distribution-free 95 %
interval. Not in ``make bench`` yet: the separate-launch rows there are the issue's design.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import WORKERS, bench_env, distrain_cmd, median, median_interval

METHODS = ("forkserver", "spawn")
# Window (s) and steps per side: the steps outlast the window at the slowest speed seen.
SETTINGS = {"digits": (10.0, 2000), "mlp": (8.0, 200)}
START_DELAY_S = 0.5


def pair(workload: str, first: str) -> dict[str, float]:
    """One concurrent pair; ``first`` is launched first. Returns steps/s per start method."""
    window, total = SETTINGS[workload]
    sync = Path(tempfile.mkdtemp(prefix="bench-start-methods-"))
    order = [first, *(m for m in METHODS if m != first)]
    procs = {}
    try:
        for method in order:
            argv = distrain_cmd("--nproc-per-node", "2", "--start-method", method,
                                str(WORKERS / "start_method_window.py"), "--sync", str(sync),
                                "--job", method, "--workload", workload, "--window", str(window),
                                "--total", str(total))
            procs[method] = subprocess.Popen(argv, env=bench_env(), stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        while not all((sync / f"ready-{method}").exists() for method in METHODS):
            if any(proc.poll() is not None for proc in procs.values()):
                break
            time.sleep(0.01)
        (sync / "go.tmp").write_text(str(time.time() + START_DELAY_S))
        os.replace(sync / "go.tmp", sync / "go")
        for method, proc in procs.items():
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"the {method} side failed (exit {proc.returncode}):\n{err[-3000:]}")
        results = {m: json.loads((sync / f"result-{m}.json").read_text()) for m in METHODS}
        for method, result in results.items():
            if result["last_step_end"] < window:
                raise RuntimeError(f"the {method} side ended inside the window: raise the steps")
        return {m: float(r["steps_per_s"]) for m, r in results.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(sync, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--workloads", default=",".join(SETTINGS))
    args = parser.parse_args(argv)
    for workload in args.workloads.split(","):
        ratios = []
        for index in range(args.pairs):
            rates = pair(workload, METHODS[index % 2])
            ratios.append(rates["forkserver"] / rates["spawn"])
            print(f"{workload} pair {index + 1}: forked {rates['forkserver']:.1f} steps/s, spawned "
                  f"{rates['spawn']:.1f}, ratio {ratios[-1]:.3f}", flush=True)
        low, high = median_interval(ratios)
        print(f"{workload}: forked/spawned median {median(ratios):.3f}, 95 % interval {low:.3f} to "
              f"{high:.3f}, forked faster in {sum(r > 1 for r in ratios)} of {len(ratios)} pairs",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
