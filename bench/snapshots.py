"""In-memory snapshots: what they cost per step, how fast a run recovers, how many steps it loses.

    python bench/snapshots.py                  # step time, recovery, snapshot fault trials
    python bench/snapshots.py --quick          # fewer pairs and repetitions, 3 trials

* Step time: ``bench/workers/snapshot_steps.py`` (2 ranks) runs each workload in alternating
  chunks with a snapshot after every step and without; ratio = median over pairs of
  (with / without). Goal for digits: <= 1.03. For the 195 MB model the interval that would keep
  it under 1.03 is derived from the per-step cost (a snapshot every N steps costs 1/N of it).
* Recovery: ``bench/workers/recovery_train.py`` (the MLP workload, 2 ranks) kills rank 1 with
  SIGKILL at a random step; the launcher restarts the group. distrain (``--max-restarts 1``, a
  snapshot every step, a durable checkpoint every 20) vs ``torchrun --max-restarts 1`` running the
  same script resuming from its last ``torch.save`` (every 20 steps). Recovery = from the kill
  to the first completed step after the restart; steps lost = kill step - resumed step.
* Fault trials: ``bench/fault_trials.py``'s snapshot variant (random rank, random step, a
  snapshot every step and a durable checkpoint every 50; bit-identical end, <= 1 step lost).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python bench/snapshots.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import fault_trials
from bench.common import WORKERS, distrain_cmd, load_note, run, torchrun_cmd

GOAL_STEP = 1.03
GOAL_RECOVERY = 0.25
SAVE_EVERY = 20


def step_time(root: Path, *, pairs: int) -> dict[str, Any]:
    """Ratio of step time with a snapshot after every step to without, per workload."""
    out = root / "steps.json"
    run(distrain_cmd("--nproc-per-node", "2", str(WORKERS / "snapshot_steps.py"), "--out", str(out),
                     "--ckpt", str(root / "steps-ckpt"), "--pairs", str(pairs)),
        timeout=1800, log=root / "steps.log").check()
    rows: dict[str, Any] = {}
    for name, result in json.loads(out.read_text()).items():
        ratios = sorted(w / wo for w, wo in result["pairs"])
        ratio = statistics.median(ratios)
        # a snapshot every N steps costs about 1/N of one after every step
        interval = max(1, math.ceil((ratio - 1) / (GOAL_STEP - 1) - 1e-9))
        rows[name] = {"ratio": round(ratio, 3), "state_mb": result["state_mb"],
                      "low": round(ratios[len(ratios) // 4], 3),
                      "high": round(ratios[3 * len(ratios) // 4], 3),
                      "interval_for_goal": interval}
        print(f"  step time {name} ({result['state_mb']} MB of state): snapshot every step / none = "
              f"{ratio:.3f} (quartiles {rows[name]['low']}-{rows[name]['high']}); a snapshot every "
              f"{rows[name]['interval_for_goal']} step(s) keeps it under {GOAL_STEP}", flush=True)
    return rows


def recovery_once(root: Path, side: str, kill_at: int) -> dict[str, float]:
    ckpt, out = root / f"{side}-{kill_at}-ckpt", root / f"{side}-{kill_at}"
    script = [str(WORKERS / "recovery_train.py"), "--ckpt", str(ckpt), "--out", str(out),
              "--kill-at", str(kill_at), "--save-every", str(SAVE_EVERY),
              "--mode", "snapshot" if side == "distrain" else "torchsave"]
    launch = distrain_cmd if side == "distrain" else torchrun_cmd
    run(launch("--nproc-per-node", "2", "--max-restarts", "1", *script), timeout=600,
        log=root / f"{side}-{kill_at}.log").check()
    killed = json.loads((out / "kill.json").read_text())
    resumed = json.loads((out / "resumed.json").read_text())
    return {"recovery_s": resumed["time"] - killed["time"], "lost": killed["step"] - resumed["step"]}


def recovery(root: Path, *, reps: int, rng: random.Random) -> dict[str, Any]:
    """distrain (snapshots) vs torchrun (torch.save): seconds to recover and steps lost."""
    runs: dict[str, list[dict[str, float]]] = {"distrain": [], "torchrun": []}
    for rep in range(reps):
        kill_at = rng.randrange(SAVE_EVERY + 2, 2 * SAVE_EVERY)
        for side in (("distrain", "torchrun") if rep % 2 == 0 else ("torchrun", "distrain")):
            runs[side].append(recovery_once(root, side, kill_at))
    result: dict[str, Any] = {}
    for side, found in runs.items():
        result[side] = {"recovery_s": round(statistics.median(r["recovery_s"] for r in found), 2),
                        "lost_mean": round(statistics.mean(r["lost"] for r in found), 1),
                        "runs": found}
    result["ratio"] = round(result["distrain"]["recovery_s"] / result["torchrun"]["recovery_s"], 3)
    print(f"  recovery from SIGKILL to the next completed step: "
          f"distrain {result['distrain']['recovery_s']}s, "
          f"torchrun {result['torchrun']['recovery_s']}s, ratio {result['ratio']} (goal <= {GOAL_RECOVERY}); "
          f"steps lost per failure: distrain {result['distrain']['lost_mean']}, "
          f"torchrun {result['torchrun']['lost_mean']} (a torch.save every {SAVE_EVERY})", flush=True)
    return result


def run_bench(*, pairs: int = 20, reps: int = 3, trials: int = 20, seed: int = 0,
              keep: Path | None = None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="snapshots-")) if keep is None else keep
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    print(f"snapshots: {pairs} pairs, {reps} recoveries per side, {trials} fault trials; {load_note()}",
          flush=True)
    try:
        report: dict[str, Any] = {"step_time": step_time(root, pairs=pairs)}
        report["recovery"] = recovery(root, reps=reps, rng=rng)
        report["trials"] = fault_trials.snapshot_trials(root / "trials", trials, rng)
        return report
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 pairs, 1 recovery per side, 3 trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="keep runs and logs here")
    args = parser.parse_args(argv)
    sizes = {"pairs": 6, "reps": 1, "trials": 3} if args.quick else {}
    report = run_bench(seed=args.seed, keep=args.keep, **sizes)
    return 0 if report["trials"]["identical"] == report["trials"]["total"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
