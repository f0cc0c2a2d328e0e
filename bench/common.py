"""What every benchmark shares: commands in their own session, bounded waits, medians, tables.

Each benchmark times real commands (``distrain launch``, ``torchrun``, Ray Train) side by side in
one run: repetitions are interleaved (A B A B ...) so that a load spike on this shared machine
hits both sides alike, and a ratio is the median of at least 5 of them.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import psutil

REPO = Path(__file__).resolve().parents[1]
WORKERS = REPO / "bench" / "workers"
PYTHON = sys.executable
DISTRIBUTED_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME")
T = TypeVar("T")


class BenchError(RuntimeError):
    """A benchmarked command failed: the message holds its command line and output tail."""


def bench_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment minus inherited distributed variables, the repo importable, Ray on loopback."""
    env = {k: v for k, v in os.environ.items()
           if k not in DISTRIBUTED_VARS and not k.startswith(("PET_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.update(extra or {})
    return env


def distrain_cmd(*args: str) -> list[str]:
    return [PYTHON, "-m", "distrain", "launch", *args]


def torchrun_cmd(*args: str) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", *args]


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished:
    """A command that ran to its end: exit code, output, when it started and ended (time.time)."""

    argv: tuple[str, ...]
    returncode: int
    output: str
    started: float
    ended: float

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def check(self) -> Finished:
        if self.returncode != 0:
            raise BenchError(f"exit {self.returncode}: {' '.join(self.argv)}\n{self.output[-3000:]}")
        return self


class Running:
    """A command started in its own session; output to a file (no pipe to fill up)."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 log: Path | None = None, cwd: Path | None = None) -> None:
        self.argv = tuple(argv)
        self._own_log = log is None  # a temporary file, removed once read
        if log is None:
            handle, name = tempfile.mkstemp(prefix="bench-", suffix=".log")
            os.close(handle)
            log = Path(name)
        self.log_path = log
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 (closed in wait/kill)
        self.started = time.time()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=bench_env(env), cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> Finished:
        """Wait for the end; on timeout kill the whole session and raise."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            text = self.output()
            self.kill()
            raise BenchError(f"timed out after {timeout:.0f}s: {' '.join(self.argv)}\n"
                             f"{text[-3000:]}") from None
        ended = time.time()
        output = self._finish()
        return Finished(argv=self.argv, returncode=code, output=output, started=self.started, ended=ended)

    def output(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._finish()

    def _finish(self) -> str:
        self._log.close()
        output = self.output()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
        return output


def run(argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
        log: Path | None = None) -> Finished:
    """Run ``argv`` to its end (output kept in ``log``) and return what happened."""
    return Running(argv, env=env, log=log).wait(timeout)


def session_leftovers(session: int, grace: float = 10.0) -> list[str]:
    """Processes still alive in a finished command's session, after up to ``grace`` s to go."""
    def members() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if os.getsid(proc.pid) == session and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    deadline = time.monotonic() + grace
    left = members()
    while left and time.monotonic() < deadline:
        psutil.wait_procs(left, timeout=0.5)
        left = members()
    described = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
    return described


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str,
               running: Running | None = None, poll: float = 0.01) -> None:
    """Poll ``condition`` until true; fail if ``running`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if running is not None and not running.alive():
            raise BenchError(f"the command ended (exit {running.proc.returncode}) before {what}:\n"
                             f"{running.output()[-3000:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"no {what} within {timeout:.0f}s")
        time.sleep(poll)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def median_interval(values: Sequence[float]) -> tuple[float, float]:
    """A distribution-free 95 % confidence interval for the median (order statistics)."""
    ordered = sorted(values)
    n = len(ordered)
    half = 0.98 * math.sqrt(n)  # 1.96 * sqrt(n) / 2
    low, high = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return ordered[low], ordered[high]


def interleave(reps: int, sides: Mapping[str, Callable[[], T]]) -> dict[str, list[T]]:
    """``reps`` rounds; each round runs every side once, the order rotating (A B, then B A)."""
    names = list(sides)
    results: dict[str, list[T]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            results[name].append(sides[name]())
    return results


def load_note() -> str:
    """The load when measuring: this machine is shared, so say how busy it was."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM, no GPU used, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table (also valid-looking markdown)."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def goal_mark(ratio: float, goal: float, *, at_most: bool) -> str:
    met = ratio <= goal if at_most else ratio >= goal
    return f"{'met' if met else 'MISSED'} ({'<=' if at_most else '>='} {goal:g})"
