"""Shared test helpers: real processes, real gloo, bounded in time, nothing left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
ABORT_LINE = "terminate called without an active exception"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: no inherited distributed variables (nor SLURM's, when the
    suite itself runs in a SLURM job), repo importable; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items()
           if (k == "PET_START_METHOD" or not k.startswith(("PET_", "TORCHELASTIC_", "SLURM_"))) and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.update(extra or {})
    return env


def run_cmd(
    argv: Sequence[str],
    *,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command in its own session; on timeout kill the whole group and fail loudly."""
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_env(env), cwd=cwd, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {argv}\n{out}\n{err}") from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def distrain(*args: str, timeout: float = 120, env: Mapping[str, str] | None = None,
             cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m distrain ARGS`` as a real subprocess."""
    return run_cmd([PYTHON, "-m", "distrain", *args], timeout=timeout, env=env, cwd=cwd)


def torchrun(*args: str, timeout: float = 120, env: Mapping[str, str] | None = None,
             cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``torchrun`` (``python -m torch.distributed.run``)."""
    return run_cmd([PYTHON, "-m", "torch.distributed.run", *args], timeout=timeout, env=env, cwd=cwd)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    """rc 0 and no teardown abort anywhere in the output."""
    text = result.stdout + result.stderr
    assert ABORT_LINE not in text, f"teardown abort (see pitfalls):\n{text[-4000:]}"
    assert result.returncode == 0, f"rc={result.returncode}\n{text[-4000:]}"


def spawn_multi_process(world_size: int, backend: str, fn: Callable[..., Any], *args: Any) -> dict[int, Any]:
    """torchtnt's helper: run ``fn(*args)`` on ``world_size`` real ranks through distrain.

    ``fn`` runs after ``distrain.ddp.init(backend)``; its return values come back by rank.
    """
    from distrain.launch import run

    return run(_init_then, backend, fn, *args, nproc=world_size)


def _init_then(backend: str, fn: Callable[..., Any], *args: Any) -> Any:
    from distrain import ddp

    ctx = ddp.init(backend)
    return fn(ctx, *args)


def wait_for_files(paths: Sequence[Path], proc: subprocess.Popen[str], seconds: float = 60) -> None:
    """Wait until every path exists (a worker announcing it is ready); fail if ``proc`` ends first."""
    deadline = time.monotonic() + seconds
    while not all(path.exists() for path in paths):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def assert_workers_gone(out: Path) -> None:
    """Every worker that wrote its ``pid-*`` file into ``out`` has exited."""
    pids = [int(p.read_text()) for p in out.glob("pid-*")]
    assert pids, "the workers never started"
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive, f"orphan workers: {alive}"


def kill_forked_at(body: Callable[[int], object], delay: float, what: str) -> None:
    """Fork a child running ``body(ready_fd)``; once it writes ``b"r"`` there (it is ready), let it
    run ``delay`` seconds, then SIGKILL and reap it: a crash at an instant chosen by the caller."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest teardown, ever
        try:
            os.close(read_end)
            body(write_end)
        finally:
            os._exit(1)
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"r", f"{what}: the child did not start"
        time.sleep(delay)  # fault injection: the instant of the kill
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)


class Killable(Protocol):
    """A started launch: its process, and how to kill it with its session."""

    proc: subprocess.Popen[str]

    def kill(self) -> None: ...


@pytest.fixture
def launches() -> Iterator[list[Killable]]:
    """The test's launches, killed (with their session) if the test ends before they do."""
    started: list[Killable] = []
    try:
        yield started
    finally:
        for launch in started:
            if launch.proc.poll() is None:
                launch.kill()
