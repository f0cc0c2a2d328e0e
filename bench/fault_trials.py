"""Kill anywhere, lose nothing: random faults in real 2-rank runs, then bit-for-bit comparison.

    python bench/fault_trials.py                  # 20 trials + preemption + hang (a few minutes)
    python bench/fault_trials.py --trials 3 --keep runs/faults
    python bench/fault_trials.py --s3 --trials 10 --no-scenarios   # checkpoints on S3 (moto)

Every trial launches ``bench/workers/fault_train.py`` (DDP, dropout, shuffled resumable loader,
a checkpoint every 2 steps, sync or async) with ``distrain launch --nproc-per-node 2
--max-restarts 2``, SIGKILLs one random rank at a random moment of its first attempt (every
third trial kills while a checkpoint is being written: the worker makes a random step's
checkpoint slow with ballast, ``--ballast-at``, and the kill lands inside that write) and lets the
launcher restart the group, which resumes from the newest checkpoint. The final weights and
optimizer state must be bit-identical to an uninterrupted run's. Prints ``k/N identical``.

Preemption: SIGTERM to the launcher mid-run; the workers agree on a step, save a checkpoint
within the grace period (``--term-timeout``) and exit; the launcher exits 143 (the preemption
exit code, 128 + SIGTERM). Launching the same command again resumes and must end bit-identical.

Snapshots (``--snapshots N``, also run by ``bench/snapshots.py``): the same worker with a snapshot
after every step and a durable checkpoint every 50; a random rank SIGKILLs itself after a random
step; the restarted run must resume from the step before the kill or later and end bit-identical,
with nothing left in ``/dev/shm``.

Hang: one rank blocks forever before a step; the other waits in DDP's gradient all-reduce until
the collective timeout (``ddp.init(timeout=...)``) fails it: the job ends with the failure
summary naming rank 0 and gloo's "Timed out waiting 5000ms" line, the timeout plus teardown after
the rank got stuck, and no process is left.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distrain.ckpt import verify

if not __package__:  # run as a script: python bench/fault_trials.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    WORKERS,
    BenchError,
    Finished,
    Running,
    distrain_cmd,
    load_note,
    session_leftovers,
    wait_until,
)

SCRIPT = str(WORKERS / "fault_train.py")
STEPS = 60
PREEMPT_EXIT = 143  # 128 + SIGTERM, what the launcher exits with after forwarding a SIGTERM
LAUNCH_TIMEOUT = 240.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Trial:
    index: int
    mode: str  # "random" or "mid-checkpoint"
    async_save: bool
    victim_rank: int
    delay_s: float
    mid_checkpoint: bool  # a checkpoint was being written when the kill landed
    killed: bool  # the SIGKILL hit a live worker of the first attempt
    restarted: bool
    identical: bool
    seconds: float
    leftovers: int


def launch_args(ckpt: Path | str, out: Path, *extra: str, max_restarts: int = 2,
                start_method: str = "forkserver", term_timeout: float = 30.0,
                log_dir: Path | None = None) -> list[str]:
    logs = ("--log-dir", str(log_dir)) if log_dir is not None else ()
    return distrain_cmd("--nproc-per-node", "2", "--max-restarts", str(max_restarts),
                        "--start-method", start_method, "--term-timeout", str(term_timeout), *logs,
                        SCRIPT, "--ckpt", str(ckpt), "--out", str(out), "--steps", str(STEPS), *extra)


def pid_of(out: Path, attempt: int, rank: int) -> int | None:
    path = out / "pids" / f"attempt{attempt}-rank{rank}"
    return int(path.read_text()) if path.exists() else None


def saving(ckpt: Path | str, step: int | None = None) -> bool:
    """A checkpoint (that of ``step``, if given) is being written: its staging directory exists
    (on S3: its step directory has objects but no manifest yet)."""
    if isinstance(ckpt, str):
        return _saving_s3(ckpt, step)
    prefix = ".tmp-" if step is None else f".tmp-step-{step:08d}"
    try:
        return any(name.startswith(prefix) for name in os.listdir(ckpt))
    except FileNotFoundError:
        return False


def reached(ckpt: Path, step: int) -> bool:
    """A checkpoint of ``step`` or later has been committed under ``ckpt``."""
    from distrain.ckpt.store import parse_step_dir

    try:
        return any((parse_step_dir(name) or -1) >= step for name in os.listdir(ckpt))
    except FileNotFoundError:
        return False


def _saving_s3(url: str, step: int | None) -> bool:
    from distrain.ckpt.objstore import ObjectStore
    from distrain.ckpt.store import MANIFEST, parse_step_dir

    store = ObjectStore(url)
    names = [n for n in store.remote.names(url) if parse_step_dir(n) is not None
             and (step is None or parse_step_dir(n) == step)]
    return any(not (store.root / name / MANIFEST).is_file() for name in names)


def identical(reference: Path, candidate: Path) -> bool:
    """Model weights and optimizer state equal bit for bit."""
    if not candidate.exists():
        return False
    ref = torch.load(reference, weights_only=True)
    got = torch.load(candidate, weights_only=True)
    same_model = ref["model"].keys() == got["model"].keys() and all(
        torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])
    ref_opt, got_opt = ref["optimizer"], got["optimizer"]
    same_opt = ref_opt["param_groups"] == got_opt["param_groups"] and ref_opt["state"].keys() == \
        got_opt["state"].keys() and all(
            torch.equal(ref_opt["state"][i]["momentum_buffer"], got_opt["state"][i]["momentum_buffer"])
            for i in ref_opt["state"])
    return same_model and same_opt


def finish(running: Running, what: str) -> tuple[Finished, list[str]]:
    """Wait for the launcher, then check that nothing of its session is left."""
    done = running.wait(LAUNCH_TIMEOUT)
    left = session_leftovers(running.pid)
    if left:
        running.kill()
        raise BenchError(f"{what}: processes left after the launcher exited: {left}")
    return done, left


def reference_run(root: Path, start_method: str) -> tuple[Path, float]:
    """The uninterrupted run: its final.pt and how long its training took (workers up to final.pt)."""
    out, ckpt = root / "reference", root / "reference-ckpt"
    running = Running(launch_args(ckpt, out, max_restarts=0, start_method=start_method),
                      log=root / "reference.log")
    wait_until(lambda: pid_of(out, 0, 0) is not None and pid_of(out, 0, 1) is not None,
               timeout=LAUNCH_TIMEOUT, what="reference workers", running=running)
    started = time.time()
    done, _ = finish(running, "reference")
    done.check()
    final = out / "final.pt"
    return final, final.stat().st_mtime - started


def run_trial(index: int, root: Path, reference: Path, window: float, rng: random.Random,
              start_method: str, s3_root: str | None = None) -> Trial:
    """One trial: launch, SIGKILL a random rank at a random moment, let it restart, compare."""
    mode = "mid-checkpoint" if index % 3 == 2 else "random"
    async_save = rng.random() < 0.5
    victim_rank = rng.randrange(2)
    out = root / f"trial{index:02d}"
    ckpt: Path | str = f"{s3_root}/trial{index:02d}" if s3_root else root / f"trial{index:02d}-ckpt"
    extra = ["--async-save"] if async_save else []
    slow_step = 2 * rng.randrange(5, 26)  # mid-checkpoint: this step's checkpoint is slow to write
    if mode == "mid-checkpoint":
        extra += ["--ballast-at", str(slow_step)]
    running = Running(launch_args(ckpt, out, *extra, start_method=start_method),
                      log=root / f"trial{index:02d}.log")
    try:
        wait_until(lambda: pid_of(out, 0, 0) is not None and pid_of(out, 0, 1) is not None,
                   timeout=LAUNCH_TIMEOUT, what="the first attempt's workers", running=running)
        victim = pid_of(out, 0, victim_rank)
        if victim is None:
            raise BenchError(f"trial {index}: no pid file for rank {victim_rank}")
        if mode == "mid-checkpoint":
            wait_until(lambda: saving(ckpt, slow_step), timeout=LAUNCH_TIMEOUT,
                       what=f"the write of checkpoint {slow_step}", running=running, poll=0.002)
            delay = rng.uniform(0.0, 0.05)  # into the write, which takes a second or so
        elif isinstance(ckpt, Path):
            # A random moment of training, found by progress rather than time: an async run's
            # saves do not block it, so it can train in a fraction of the sync reference's time.
            target = 2 * rng.randrange(2, STEPS // 2 - 2)
            wait_until(lambda: reached(ckpt, target), timeout=LAUNCH_TIMEOUT,
                       what=f"checkpoint {target}", running=running, poll=0.002)
            delay = rng.uniform(0.0, 0.05)  # into the next steps, which take tens of ms each
        else:
            delay = rng.uniform(0.0, window * 0.8)
        time.sleep(delay)  # fault injection: a random instant, not synchronisation
        mid = saving(ckpt)  # a checkpoint is being written at this instant
        try:
            os.kill(victim, signal.SIGKILL)
            killed = True
        except ProcessLookupError:  # the first attempt had ended already
            killed = False
        done, left = finish(running, f"trial {index}")
    except BaseException:
        running.kill()
        raise
    restarted = pid_of(out, 1, 0) is not None
    same = done.returncode == 0 and identical(reference, out / "final.pt")
    if not same:
        print(f"  trial {index}: rc {done.returncode}, output tail:\n{done.output[-2500:]}", flush=True)
    return Trial(index=index, mode=mode, async_save=async_save, victim_rank=victim_rank,
                 delay_s=round(delay, 3), mid_checkpoint=mid, killed=killed, restarted=restarted,
                 identical=same, seconds=round(done.seconds, 1), leftovers=len(left))


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotTrial:
    index: int
    victim_rank: int
    kill_at: int
    resumed_at: int | None
    from_snapshot: bool
    identical: bool
    shm_left: bool
    seconds: float


def snapshot_trial(index: int, root: Path, reference: Path, rng: random.Random) -> SnapshotTrial:
    """One snapshot trial: rank R SIGKILLs itself after step K; resume from >= K-1, identical."""
    from distrain.ckpt.snapshot import run_dir

    victim, kill_at = rng.randrange(2), rng.randrange(2, STEPS - 1)
    out, ckpt = root / f"snap{index:02d}", root / f"snap{index:02d}-ckpt"
    argv = launch_args(ckpt, out, "--save-every", "50", "--snapshot-every", "1",
                       "--kill-rank", str(victim), "--kill-at", str(kill_at), max_restarts=1)
    try:
        done, _ = finish(Running(argv, log=root / f"snap{index:02d}.log"), f"snapshot trial {index}")
        found = re.findall(r"resumed from (snapshot step|step) (\d+)", done.output)
        left = run_dir(ckpt).exists()
    finally:
        shutil.rmtree(run_dir(ckpt), ignore_errors=True)
    same = done.returncode == 0 and identical(reference, out / "final.pt")
    if not same:
        print(f"  snapshot trial {index}: rc {done.returncode}, output tail:\n{done.output[-2500:]}",
              flush=True)
    return SnapshotTrial(index=index, victim_rank=victim, kill_at=kill_at,
                         resumed_at=int(found[-1][1]) if found else None,
                         from_snapshot=bool(found) and found[-1][0] == "snapshot step",
                         identical=same, shm_left=left, seconds=round(done.seconds, 1))


def snapshot_trials(root: Path, trials: int, rng: random.Random,
                    start_method: str = "forkserver") -> dict[str, Any]:
    """``trials`` snapshot trials against one uninterrupted reference run; prints as it goes."""
    root.mkdir(parents=True, exist_ok=True)
    reference, _ = reference_run(root, start_method)
    results = []
    for index in range(trials):
        trial = snapshot_trial(index, root, reference, rng)
        results.append(trial)
        lost = None if trial.resumed_at is None else trial.kill_at - trial.resumed_at
        print(f"  snapshot trial {index:2d}: rank {trial.victim_rank} killed after step {trial.kill_at}, "
              f"resumed from {'snapshot' if trial.from_snapshot else 'checkpoint'} step {trial.resumed_at} "
              f"({lost} lost) -> {'identical' if trial.identical else 'DIFFERENT'}"
              f"{' SNAPSHOTS LEFT IN /dev/shm' if trial.shm_left else ''} ({trial.seconds}s)", flush=True)
    good = [t for t in results if t.identical and not t.shm_left and t.resumed_at is not None
            and t.resumed_at >= t.kill_at - 1]
    lost = [t.kill_at - t.resumed_at for t in results if t.resumed_at is not None]
    print(f"{len(good)}/{trials} snapshot trials identical, <= 1 step lost, nothing left in /dev/shm "
          f"(steps lost: mean {sum(lost) / max(len(lost), 1):.2f}, max {max(lost, default=0)})", flush=True)
    return {"trials": [asdict(t) for t in results], "identical": len(good), "total": trials,
            "lost_mean": round(sum(lost) / max(len(lost), 1), 2), "lost_max": max(lost, default=0)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Preemption:
    exit_code: int
    saved_step: int | None
    checkpoint_verified: bool  # the preemption checkpoint is complete (manifest hashes match)
    seconds_to_exit: float  # SIGTERM to launcher exit: must stay within the grace period
    grace_s: float
    resumed_ok: bool
    identical: bool


def preemption(root: Path, reference: Path, rng: random.Random, start_method: str,
               grace: float = 20.0) -> Preemption:
    """SIGTERM the launcher mid-run; the workers checkpoint and exit; the relaunch ends identical."""
    out, ckpt = root / "preempt", root / "preempt-ckpt"
    argv = launch_args(ckpt, out, "--save-every", "20", max_restarts=0, start_method=start_method,
                       term_timeout=grace)
    running = Running(argv, log=root / "preempt-1.log")
    try:
        wait_until(lambda: (ckpt / "step-00000020").is_dir(), timeout=LAUNCH_TIMEOUT,
                   what="the first checkpoint", running=running)
        time.sleep(rng.uniform(0.0, 0.2))  # fault injection: a random instant
        sent = time.time()
        os.kill(running.pid, signal.SIGTERM)
        first, _ = finish(running, "preempted run")
    except BaseException:
        running.kill()
        raise
    marker = out / "preempted"
    saved = json.loads(marker.read_text())["step"] if marker.exists() else None
    verified = saved is not None and verify(ckpt / f"step-{saved:08d}").ok
    second, _ = finish(Running(argv, log=root / "preempt-2.log"), "resumed run")
    resumed = second.returncode == 0 and f"resumed from step {saved}" in second.output
    return Preemption(exit_code=first.returncode, saved_step=saved, checkpoint_verified=verified,
                      seconds_to_exit=round(first.ended - sent, 2), grace_s=grace,
                      resumed_ok=resumed, identical=identical(reference, out / "final.pt"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Hang:
    exit_code: int
    timeout_s: float
    seconds_to_exit: float  # from the moment the rank got stuck to the launcher's exit
    names_failed_rank: bool  # the summary names the rank whose collective timed out, and why
    leftovers: int
    summary: str


def hang(root: Path, *, timeout: float = 5.0, start_method: str = "forkserver") -> Hang:
    """Rank 1 blocks before step 10; rank 0's collective must time out and fail the job."""
    out, ckpt = root / "hang", root / "hang-ckpt"
    argv = launch_args(ckpt, out, "--hang-rank", "1", "--hang-at", "10", "--timeout", str(timeout),
                       max_restarts=0, start_method=start_method, term_timeout=timeout,
                       log_dir=root / "hang-logs")  # the hang watch's stack files stay under root
    running = Running(argv, log=root / "hang.log")
    try:
        done, left = finish(running, "hang")
    except BaseException:
        running.kill()
        raise
    stuck_at = json.loads((out / "hang.json").read_text())["time"] if (out / "hang.json").exists() else None
    summary = done.output[done.output.find("distrain: the job failed"):][:2000]
    return Hang(
        exit_code=done.returncode, timeout_s=timeout,
        seconds_to_exit=round(done.ended - stuck_at, 2) if stuck_at else float("nan"),
        names_failed_rank="rank 0 (local rank 0" in summary and "collective timed out" in summary,
        leftovers=len(left), summary=summary,
    )


def run(trials: int = 20, *, seed: int = 0, keep: Path | None = None, start_method: str = "forkserver",
        scenarios: bool = True, s3: bool = False) -> dict[str, Any]:
    """All trials (and the preemption and hang scenarios); prints as it goes, returns the results.
    ``s3``: the trials checkpoint to moto's S3 server on 127.0.0.1 (started here) instead."""
    if s3:
        from distrain.env import scoped_environ
        from tests.helpers.s3server import s3_server

        with s3_server() as server, scoped_environ(server.env()):  # the launched ranks inherit it
            return _run(trials, seed=seed, keep=keep, start_method=start_method, scenarios=scenarios,
                        s3_root=f"s3://{server.make_bucket('fault-trials')}")
    return _run(trials, seed=seed, keep=keep, start_method=start_method, scenarios=scenarios)


def _run(trials: int, *, seed: int, keep: Path | None, start_method: str, scenarios: bool,
         s3_root: str | None = None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fault-trials-")) if keep is None else keep
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    where = f", checkpoints on {s3_root}" if s3_root else ""
    print(f"fault trials: {trials} trials, {start_method}{where}; {load_note()}", flush=True)
    try:
        reference, train_s = reference_run(root, start_method)
        window = max(train_s, 0.5)
        print(f"  reference run: training took {train_s:.1f}s (the kill window)", flush=True)
        results = []
        for index in range(trials):
            trial = run_trial(index, root, reference, window, rng, start_method, s3_root)
            results.append(trial)
            print(f"  trial {index:2d}: {trial.mode:<14} rank {trial.victim_rank} after {trial.delay_s:.2f}s"
                  f"{' mid-checkpoint' if trial.mid_checkpoint else ''}"
                  f"{' async' if trial.async_save else ''} -> "
                  f"{'identical' if trial.identical else 'DIFFERENT'}"
                  f"{'' if trial.killed and trial.restarted else ' (kill missed)'} ({trial.seconds}s)",
                  flush=True)
        same = sum(t.identical and t.killed and t.restarted for t in results)
        hits = sum(t.killed for t in results)
        print(f"{same}/{trials} identical after a kill ({hits} kills hit a live worker, "
              f"{sum(t.restarted for t in results)} restarted, "
              f"{sum(t.mid_checkpoint for t in results)} killed mid-checkpoint)", flush=True)
        report: dict[str, Any] = {"trials": [asdict(t) for t in results], "identical": same,
                                  "total": trials, "reference_train_s": round(train_s, 2)}
        if scenarios:
            pre = preemption(root, reference, rng, start_method)
            print(f"preemption: launcher exit {pre.exit_code} {pre.seconds_to_exit}s after SIGTERM "
                  f"(grace {pre.grace_s:g}s), checkpoint at step {pre.saved_step} "
                  f"{'verified' if pre.checkpoint_verified else 'NOT VERIFIED'}, relaunch "
                  f"{'resumed' if pre.resumed_ok else 'FAILED'}, "
                  f"{'identical' if pre.identical else 'DIFFERENT'}", flush=True)
            report["preemption"] = asdict(pre)
            stuck = hang(root, start_method=start_method)
            print(f"hang: exit {stuck.exit_code} {stuck.seconds_to_exit}s after rank 1 got stuck "
                  f"(collective timeout {stuck.timeout_s:g}s), summary names rank 0 and the timeout: "
                  f"{stuck.names_failed_rank}, processes left: {stuck.leftovers}", flush=True)
            report["hang"] = asdict(stuck)
        return report
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-method", default="forkserver", choices=("forkserver", "spawn"))
    parser.add_argument("--keep", type=Path, default=None, help="keep runs, logs and checkpoints here")
    parser.add_argument("--no-scenarios", action="store_true", help="trials only: no preemption, no hang")
    parser.add_argument("--s3", action="store_true",
                        help="trials checkpoint to moto's S3 server on 127.0.0.1 (needs moto[server])")
    parser.add_argument("--snapshots", type=int, default=0, metavar="N",
                        help="N snapshot trials instead of the others (bench/snapshots.py runs 20)")
    args = parser.parse_args(argv)
    if args.snapshots:
        root = Path(tempfile.mkdtemp(prefix="snapshot-trials-")) if args.keep is None else args.keep
        try:
            snaps = snapshot_trials(root, args.snapshots, random.Random(args.seed), args.start_method)
        finally:
            if args.keep is None:
                shutil.rmtree(root, ignore_errors=True)
        return 0 if snaps["identical"] == snaps["total"] else 1
    report = run(args.trials, seed=args.seed, keep=args.keep, start_method=args.start_method,
                 scenarios=not args.no_scenarios, s3=args.s3)
    ok = report["identical"] == report["total"]
    if "preemption" in report:
        pre = report["preemption"]
        ok = ok and pre["exit_code"] == PREEMPT_EXIT and pre["identical"] and pre["checkpoint_verified"]
        stuck = report["hang"]
        ok = ok and stuck["exit_code"] == 1 and stuck["names_failed_rank"] and not stuck["leftovers"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
