"""In-memory snapshots: what they cost per step, how fast a run recovers, how many steps it loses.

    python bench/snapshots.py                  # step time, recovery, snapshot fault trials
    python bench/snapshots.py --quick          # fewer pairs and repetitions, 3 trials

* Step time: ``bench/workers/snapshot_steps.py`` (2 ranks) runs each workload in alternating
  chunks with a snapshot after every step and without; a launch's ratio = median over its pairs
  of (with / without), with a distribution-free 95 % interval. A digits chunk lasts about 0.1 s,
  so single pairs vary by +-15 %, and whole launches of the same code differ by more than the
  goal's margin (1.06 to 1.19 on one day): digits runs ten times the pairs, split over
  :data:`DIGITS_LAUNCHES` launches (200 pairs each in ``make bench``), and its ratio is the
  median of the launches' ratios. Goal for digits: <= 1.03. For every workload the interval
  that would keep it under 1.03 is derived from the per-step cost (a snapshot every N steps
  costs about 1/N of it), then measured, and twice it where that misses: snapshots taken after
  several steps without one cost more each.
* Recovery: ``bench/workers/recovery_train.py`` (the MLP workload, 2 ranks) kills rank 1 with
  SIGKILL at a random step; the launcher restarts the group. distrain (``--max-restarts 1``, a
  snapshot every step, a durable checkpoint every 20) vs ``torchrun --max-restarts 1`` running the
  same script resuming from its last ``torch.save`` (every 20 steps). Recovery = from the kill
  to the first completed step after the restart; steps lost = kill step - resumed step.
* Goodput: the same script for as many steps as a clean distrain run does in
  ``--goodput-seconds`` (180; sized by a 40-step probe run), with a random worker SIGKILLed
  every ``--kill-every`` seconds (30) and up to 100 restarts; goodput = the wall time of the
  same run without faults / the wall time with them, distrain vs torchrun (clean runs of both
  first, then the runs with faults). A run with faults still going after four times its clean
  run's time is stopped: its goodput is reported as below 0.25.
* Fault trials: ``bench/fault_trials.py``'s snapshot variant (random rank, random step, a
  snapshot every step and a durable checkpoint every 50; bit-identical end, <= 1 step lost).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python bench/snapshots.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import fault_trials
from bench.common import WORKERS, Running, distrain_cmd, load_note, median_interval, run, torchrun_cmd

GOAL_STEP = 1.03
GOAL_RECOVERY = 0.25
SAVE_EVERY = 20
#: Phases of a recovery: (name, recovery_train.py's mark at its end).
PHASES = (("restart", "started"), ("group", "group"), ("build", "built"), ("load", "loaded"),
          ("first_step", "time"))


DIGITS_PAIRS = 10  # times the pairs of the other workloads: its chunks are short and noisy
DIGITS_LAUNCHES = 5  # launches differ by more than a launch's interval: judge their median


def step_time(root: Path, *, pairs: int) -> dict[str, Any]:
    """Ratio of step time with a snapshot after every step to without, per workload; then the
    interval that keeps each under the goal, derived from that ratio and measured."""
    counts = {"digits": DIGITS_PAIRS * pairs, "mlp": pairs, "large": pairs}
    found: dict[str, list[dict[str, Any]]] = {}
    # mlp and large in one launch, digits in launches of its own
    for index, workloads in enumerate([["mlp", "large"]] + [["digits"]] * DIGITS_LAUNCHES):
        for name, result in _launch(root, index, workloads, counts, {}).items():
            found.setdefault(name, []).append(result)
    rows = {name: _step_row(runs) for name, runs in found.items()}
    _check_intervals(root, rows, counts)
    for name, row in rows.items():
        over = (f"median of {len(row['launches'])} launches (each: {', '.join(map(str, row['launches']))}), "
                if len(row["launches"]) > 1 else "")
        checked = "; ".join(f"every {every}: {ratio:.3f}" for every, ratio in row["checked"])
        print(f"  step time {name} ({row['state_mb']} MB of state): snapshot every step / none = "
              f"{row['ratio']:.3f}, {over}{row['pairs']} pairs (95 % interval of a launch "
              f"{row['interval_95'][0]:.3f}-{row['interval_95'][1]:.3f}; CPU time {row['cpu_ratio']:.3f}); "
              f"the cost divided by the interval says every {row['interval_derived']} step(s) keeps it "
              f"under {GOAL_STEP}; measured: {checked or 'not needed'}; "
              f"interval that met it: {row['interval_for_goal'] or 'none checked'}", flush=True)
    return rows


def _launch(root: Path, index: int, workloads: list[str], counts: dict[str, int],
            every: dict[str, int]) -> dict[str, dict[str, Any]]:
    """One launch of snapshot_steps.py: each workload's figures (:func:`_launch_ratio`);
    ``every``: a snapshot interval per workload (1 if absent)."""
    out = root / f"steps-{index}.json"
    intervals = {name: every.get(name, 1) for name in workloads}

    def spec(values: dict[str, int]) -> str:
        return ",".join(f"{name}={value}" for name, value in values.items())

    run(distrain_cmd("--nproc-per-node", "2", str(WORKERS / "snapshot_steps.py"), "--out", str(out),
                     "--ckpt", str(root / "steps-ckpt"), "--workloads", ",".join(workloads),
                     "--pairs", spec({name: counts[name] for name in workloads}),
                     "--snapshot-every", spec(intervals)),
        timeout=1800, log=root / f"steps-{index}.log").check()
    return {name: _launch_ratio(result) for name, result in json.loads(out.read_text()).items()}


def _check_intervals(root: Path, rows: dict[str, Any], counts: dict[str, int]) -> None:
    """Measure each workload at the interval its ratio suggests (a snapshot every N steps costs
    about 1/N of one every step); where that misses the goal, once more at twice it. Derived
    alone it can mislead: a snapshot taken after several steps without one costs more."""
    for row in rows.values():
        row["checked"], row["interval_for_goal"] = [], None if row["ratio"] > GOAL_STEP else 1
    for index in (100, 101):  # the launches' file names, apart from the first ones'
        todo = {name: row["interval_derived"] * (2 if row["checked"] else 1)
                for name, row in rows.items() if row["interval_for_goal"] is None}
        if not todo:
            return
        for name, result in _launch(root, index, list(todo), counts, todo).items():
            ratio = result["ratio"]
            rows[name]["checked"].append((todo[name], round(ratio, 3)))
            if ratio <= GOAL_STEP:
                rows[name]["interval_for_goal"] = todo[name]


def _launch_ratio(result: dict[str, Any]) -> dict[str, Any]:
    """One launch's figures for one workload: median, interval and quartiles over its pairs."""
    ratios = sorted(w / wo for w, wo in result["pairs"])
    low, high = median_interval(ratios)
    return {"ratio": statistics.median(ratios), "interval_95": (low, high),
            "quartiles": (ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]),
            "cpu_ratio": statistics.median(w / wo for w, wo in result["cpu_pairs"]),
            "pairs": len(ratios), "state_mb": result["state_mb"]}


def _step_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A workload's row: the median over its launches (the middle launch's interval and
    quartiles, a launch's own spread), and every launch's ratio."""
    middle = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
    ratio = statistics.median(r["ratio"] for r in runs)
    return {"ratio": round(ratio, 3), "state_mb": middle["state_mb"],
            "low": round(middle["quartiles"][0], 3), "high": round(middle["quartiles"][1], 3),
            # a snapshot every N steps costs about 1/N of one after every step (checked later)
            "interval_derived": max(1, math.ceil((ratio - 1) / (GOAL_STEP - 1) - 1e-9)),
            "cpu_ratio": round(statistics.median(r["cpu_ratio"] for r in runs), 3),
            "pairs": sum(r["pairs"] for r in runs),
            "interval_95": [round(v, 3) for v in middle["interval_95"]],
            "launches": [round(r["ratio"], 3) for r in runs]}


def recovery_once(root: Path, side: str, kill_at: int) -> dict[str, Any]:
    ckpt, out = root / f"{side}-{kill_at}-ckpt", root / f"{side}-{kill_at}"
    script = [str(WORKERS / "recovery_train.py"), "--ckpt", str(ckpt), "--out", str(out),
              "--kill-at", str(kill_at), "--save-every", str(SAVE_EVERY),
              "--mode", "snapshot" if side == "distrain" else "torchsave"]
    launch = distrain_cmd if side == "distrain" else torchrun_cmd
    run(launch("--nproc-per-node", "2", "--max-restarts", "1", *script), timeout=600,
        log=root / f"{side}-{kill_at}.log").check()
    killed = json.loads((out / "kill.json").read_text())
    resumed = json.loads((out / "resumed.json").read_text())
    phases: dict[str, float] = {}  # where the time went: the launcher's restart, then the new script's phases
    last = killed["time"]
    for phase, mark in PHASES:
        if mark in resumed:
            phases[phase] = round(resumed[mark] - last, 2)
            last = resumed[mark]
    return {"recovery_s": resumed["time"] - killed["time"], "lost": killed["step"] - resumed["step"],
            "phases": phases}


def recovery(root: Path, *, reps: int, rng: random.Random) -> dict[str, Any]:
    """distrain (snapshots) vs torchrun (torch.save): seconds to recover and steps lost."""
    runs: dict[str, list[dict[str, Any]]] = {"distrain": [], "torchrun": []}
    for rep in range(reps):
        kill_at = rng.randrange(SAVE_EVERY + 2, 2 * SAVE_EVERY)
        for side in (("distrain", "torchrun") if rep % 2 == 0 else ("torchrun", "distrain")):
            runs[side].append(recovery_once(root, side, kill_at))
    result: dict[str, Any] = {}
    for side, found in runs.items():
        phases = {name: round(statistics.median(r["phases"].get(name, 0.0) for r in found), 2)
                  for name, _ in PHASES}
        result[side] = {"recovery_s": round(statistics.median(r["recovery_s"] for r in found), 2),
                        "lost_mean": round(statistics.mean(r["lost"] for r in found), 1),
                        "phases": phases, "runs": found}
    result["ratio"] = round(result["distrain"]["recovery_s"] / result["torchrun"]["recovery_s"], 3)
    print(f"  recovery from SIGKILL to the next completed step: "
          f"distrain {result['distrain']['recovery_s']}s, "
          f"torchrun {result['torchrun']['recovery_s']}s, ratio {result['ratio']} (goal <= {GOAL_RECOVERY}); "
          f"steps lost per failure: distrain {result['distrain']['lost_mean']}, "
          f"torchrun {result['torchrun']['lost_mean']} (a torch.save every {SAVE_EVERY})", flush=True)
    for side in ("distrain", "torchrun"):
        spent = ", ".join(f"{name} {seconds}s" for name, seconds in result[side]["phases"].items())
        print(f"    {side}: kill -> {spent} (medians)", flush=True)
    return result


def newest_pids(out: Path) -> list[int]:
    """The pids of the newest attempt's ranks (from recovery_train.py's pid files)."""
    found: dict[int, list[int]] = {}
    for path in (out / "pids").glob("attempt*-rank*"):
        attempt = int(path.name.split("-")[0].removeprefix("attempt"))
        found.setdefault(attempt, []).append(json.loads(path.read_text())["pid"])
    return found[max(found)] if found else []


def goodput_once(root: Path, side: str, *, steps: int, kill_every: float | None,
                 rng: random.Random, give_up_after: float | None = None,
                 name: str | None = None) -> dict[str, Any]:
    """Wall time of one run (and how many kills landed), with a kill every ``kill_every`` s.
    ``give_up_after``: seconds after which a run with faults is stopped (``wall_s`` None): a
    launcher whose restart outlasts the interval between kills never gets to the end."""
    name = name or f"goodput-{side}-{'faults' if kill_every else 'clean'}"
    ckpt, out = root / f"{name}-ckpt", root / name
    script = [str(WORKERS / "recovery_train.py"), "--ckpt", str(ckpt), "--out", str(out),
              "--steps", str(steps), "--save-every", str(SAVE_EVERY),
              "--mode", "snapshot" if side == "distrain" else "torchsave"]
    launch = distrain_cmd if side == "distrain" else torchrun_cmd
    running = Running(launch("--nproc-per-node", "2", "--max-restarts", "100", *script),
                      log=root / f"{name}.log")
    kills = 0
    try:
        next_kill = time.time() + (kill_every or 0)
        while kill_every and running.alive():
            if give_up_after is not None and time.time() - running.started > give_up_after:
                running.kill()
                return {"wall_s": None, "kills": kills}
            if time.time() >= next_kill:
                pids = newest_pids(out)
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1
                next_kill += kill_every
            time.sleep(0.1)  # polling a benchmark's clock, not synchronisation
        done = running.wait(3600).check()
    except BaseException:
        running.kill()
        raise
    return {"wall_s": round(done.seconds, 1), "kills": kills}


def steps_for(root: Path, seconds: float, rng: random.Random) -> int:
    """The step count whose clean distrain run takes about ``seconds`` (start-up included), from
    a 40-step probe run: its start-up and its loop's speed (the marks recovery_train.py writes)."""
    probe = 40
    run_ = goodput_once(root, "distrain", steps=probe, kill_every=None, rng=rng, name="goodput-probe")
    out = root / "goodput-probe"
    started = min(json.loads(p.read_text())["time"] for p in (out / "pids").glob("attempt0-rank*"))
    loop = json.loads((out / "done.json").read_text())["time"] - started
    startup = max(run_["wall_s"] - loop, 0.0)
    return max(probe, round((seconds - startup) * probe / max(loop, 1e-3)))


def goodput(root: Path, *, steps: int | None = None, seconds: float = 180.0, kill_every: float,
            rng: random.Random) -> dict[str, Any]:
    """Clean wall time / wall time with faults, per side, of a run of ``steps`` steps (or of as
    many as a clean distrain run does in ``seconds``); a run with faults that takes more than
    four times its clean run is stopped, and its goodput reported as below 0.25."""
    if steps is None:
        steps = steps_for(root, seconds, rng)
    result: dict[str, Any] = {"steps": steps, "kill_every_s": kill_every}
    cleans = {side: goodput_once(root, side, steps=steps, kill_every=None, rng=rng)
              for side in ("distrain", "torchrun")}
    for side in ("distrain", "torchrun"):
        clean = cleans[side]
        faulty = goodput_once(root, side, steps=steps, kill_every=kill_every, rng=rng,
                              give_up_after=4 * clean["wall_s"])
        figure = round(clean["wall_s"] / faulty["wall_s"], 3) if faulty["wall_s"] else None
        result[side] = {"clean_s": clean["wall_s"], "faults_s": faulty["wall_s"], "kills": faulty["kills"],
                        "goodput": figure, "stopped": figure is None}
    shown = {side: "<0.25 (stopped)" if result[side]["stopped"] else result[side]["goodput"]
             for side in ("distrain", "torchrun")}
    print(f"  goodput, a worker killed every {kill_every:g}s: distrain {shown['distrain']} "
          f"({result['distrain']['kills']} kills, {result['distrain']['clean_s']}s clean, "
          f"{result['distrain']['faults_s']}s with faults), torchrun {shown['torchrun']} "
          f"({result['torchrun']['kills']} kills, {result['torchrun']['clean_s']}s clean, "
          f"{result['torchrun']['faults_s']}s with faults); {steps} steps", flush=True)
    return result


def run_bench(*, pairs: int = 20, reps: int = 3, trials: int = 20, seed: int = 0,
              goodput_seconds: float = 180.0, goodput_steps: int | None = None,
              kill_every: float = 30.0, keep: Path | None = None,
              skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``goodput_seconds``: 0 for no goodput runs; ``goodput_steps`` instead of sizing them by
    time; ``skip``: any of ``step_time``, ``recovery`` (run the rest only)."""
    root = Path(tempfile.mkdtemp(prefix="snapshots-")) if keep is None else keep
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    print(f"snapshots: {pairs} pairs, {reps} recoveries per side, {trials} fault trials; {load_note()}",
          flush=True)
    try:
        report: dict[str, Any] = {}
        if "step_time" not in skip:
            report["step_time"] = step_time(root, pairs=pairs)
        if "recovery" not in skip:
            report["recovery"] = recovery(root, reps=reps, rng=rng)
        if goodput_seconds or goodput_steps:
            report["goodput"] = goodput(root, steps=goodput_steps, seconds=goodput_seconds,
                                        kill_every=kill_every, rng=rng)
        if trials:
            report["trials"] = fault_trials.snapshot_trials(root / "trials", trials, rng)
        return report
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"6 pairs (60 in each of {DIGITS_LAUNCHES} launches for digits), "
                             "1 recovery per side, 3 trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="keep runs and logs here")
    parser.add_argument("--goodput-seconds", type=float, default=None,
                        help="length of a clean goodput run (default 180; 0: no goodput runs)")
    parser.add_argument("--goodput-steps", type=int, default=None, help="a fixed step count instead")
    parser.add_argument("--kill-every", type=float, default=30.0)
    parser.add_argument("--skip-trials", action="store_true")
    parser.add_argument("--only-goodput", action="store_true", help="no step time or recovery runs")
    args = parser.parse_args(argv)
    sizes: dict[str, Any] = {"pairs": 6, "reps": 1, "trials": 3, "goodput_seconds": 0} if args.quick else {}
    if args.goodput_seconds is not None:
        sizes["goodput_seconds"] = args.goodput_seconds
    if args.goodput_steps is not None:
        sizes["goodput_steps"] = args.goodput_steps
    if args.only_goodput:
        sizes["skip"] = ("step_time", "recovery")
    if args.skip_trials:
        sizes["trials"] = 0
    report = run_bench(seed=args.seed, keep=args.keep, kill_every=args.kill_every, **sizes)
    if not args.skip_trials and report["trials"]["identical"] != report["trials"]["total"]:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
