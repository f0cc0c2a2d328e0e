"""Count teardown aborts (SIGABRT, "terminate called without an active exception") over many runs.

    python bench/teardown_stress.py        # 200 DDP; 50 each: spawn, atexit, FSDP, Ray; torchrun beside
    python bench/teardown_stress.py --runs 30 --only ddp

Each run is a fresh 2-rank launch of a 3-step training script; an abort is any run whose output
holds the terminate line or whose exit code is non-zero. Prints ``aborts: k/N`` per variant,
with the plain script under real torchrun beside ours for the side-by-side rate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ABORT_LINE = "terminate called without an active exception"


@dataclass(frozen=True, slots=True, kw_only=True)
class Tally:
    name: str
    runs: int
    aborts: int
    other_failures: int
    seconds: float

    def line(self) -> str:
        return (f"{self.name:<28} aborts: {self.aborts}/{self.runs}   other failures: "
                f"{self.other_failures}   ({self.seconds / max(1, self.runs):.1f} s/run)")


def count_aborts(name: str, argv: Sequence[str], runs: int, env: dict[str, str] | None = None,
                 timeout: float = 120) -> Tally:
    """Run ``argv`` ``runs`` times; count teardown aborts and other failures."""
    aborts = failures = 0
    start = time.monotonic()
    child_env = {**os.environ, **(env or {})}
    for _ in range(runs):
        result = subprocess.run(list(argv), capture_output=True, text=True, env=child_env,
                                timeout=timeout, check=False)
        output = result.stdout + result.stderr
        if ABORT_LINE in output or result.returncode in (-6, 134):
            aborts += 1
        elif result.returncode != 0:
            failures += 1
            print(f"  {name}: rc={result.returncode}\n{output[-1500:]}", file=sys.stderr)
    return Tally(name=name, runs=runs, aborts=aborts, other_failures=failures,
                 seconds=time.monotonic() - start)


def distrain_launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "distrain", "launch", "--nproc-per-node", "2", *args]


Variant = tuple[list[str], int, dict[str, str]]


def variants(runs: int, side_runs: int, with_ray: bool) -> dict[str, Variant]:
    tiny = str(HERE / "scripts" / "distrain_ddp_tiny.py")
    plain = str(HERE / "scripts" / "plain_ddp_tiny.py")
    table = {
        # "ddp": the default start method (the preloaded forkserver), what users get.
        "ddp": (distrain_launch(tiny), runs, {}),
        "ddp-spawn": (distrain_launch("--start-method", "spawn", tiny), side_runs, {}),
        "ddp-atexit": (distrain_launch(tiny), side_runs, {"CALL_CLEANUP": "0"}),
        "fsdp": (distrain_launch(tiny), side_runs, {"STRATEGY": "fsdp"}),
        "torchrun-plain": ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", plain],
                           runs, {}),
        "torchrun-plain-fixed": ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                  plain], side_runs, {"CLEAN_EXIT": "1"}),
    }
    if with_ray:  # main() adds --address of the head it starts
        table["ray"] = (distrain_launch("--launcher", "ray", tiny), side_runs, {})
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="runs of DDP and of raw torchrun")
    parser.add_argument("--side-runs", type=int, default=50, help="runs of FSDP, atexit, Ray, fixed")
    parser.add_argument("--only", default="", help="comma-separated variants")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray variant")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    with_ray = not args.no_ray and (not only or "ray" in only)
    tallies = []
    for name, (command, runs, env) in variants(args.runs, args.side_runs, with_ray).items():
        if only and name not in only:
            continue
        if name == "ray":
            # A head of its own, started right before its runs (`ray start`, token auth on, as
            # users get it); the driver then needs RAY_AUTH_MODE=token too.
            address, stop_ray = _start_ray()
            try:
                tally = count_aborts(name, [*command[:-1], "--address", address, command[-1]], runs,
                                     {**env, "RAY_AUTH_MODE": "token"})
            finally:
                stop_ray()
        else:
            tally = count_aborts(name, command, runs, env)
        print(tally.line(), flush=True)
        tallies.append(tally)
    ours = [t for t in tallies if not t.name.startswith("torchrun")]
    return 1 if any(t.aborts or t.other_failures for t in ours) else 0


def _start_ray():  # type: ignore[no-untyped-def]
    """A local Ray head on the loopback for the Ray variant; returns (address, stop)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    temp = tempfile.mkdtemp(prefix="ray-stress-")
    subprocess.run(["ray", "start", "--head", "--num-cpus", "4", "--include-dashboard=false",
                    f"--temp-dir={temp}", "--port=0"], check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    address = (Path(temp) / "ray_current_cluster").read_text().strip()

    def stop() -> None:
        # Only this head: `ray stop` alone would stop every Ray on the machine.
        for pid in _pids_under(temp, address):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)

    return address, stop


def _pids_under(temp: str, address: str) -> list[int]:
    """Processes of the Ray head started in ``temp`` (their command lines name it or its address),
    with their children (Ray's workers)."""
    import psutil

    found: set[int] = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(temp in part or address in part for part in proc.info["cmdline"] or ()):
                found.add(proc.pid)
                found.update(child.pid for child in proc.children(recursive=True))
    return sorted(found)


if __name__ == "__main__":
    raise SystemExit(main())
