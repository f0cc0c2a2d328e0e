"""``distrain launch`` on separate hosts (tests/hosts.py): start one agent per host, collect them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Mapping, Sequence

from tests.helpers import PYTHON, child_env
from tests.hosts import Host


def rdzv_flags(backend: str, hosts: Sequence[Host], host: Host, port: int, nnodes: str) -> list[str]:
    """The rendezvous flags a user gives on ``host``: static (node rank) or c10d (job id)."""
    if backend == "static":
        return ["--nnodes", nnodes, "--node-rank", str(hosts.index(host)), "--master-addr",
                hosts[0].name, "--master-port", str(port)]
    return ["--nnodes", nnodes, "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts[0].name}:{port}",
            "--rdzv-id", "job"]


def start_agent(host: Host, flags: Sequence[str], script: str, args: Sequence[str] = (),
                env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """``distrain launch FLAGS SCRIPT ARGS`` on ``host``; OUT_DIR is ``out`` on the host's own disk."""
    extra = {"TMPDIR": str(host.workdir / "tmp"), "OUT_DIR": str(host.workdir / "out"), **(env or {})}
    return host.popen([PYTHON, "-m", "distrain", "launch", *flags, script, *args], child_env(extra))


def launch(hosts: Sequence[Host], backend: str, script: str, *, nproc: int = 1, nnodes: str | None = None,
           extra_flags: Sequence[str] = (), args: Sequence[str] = (),
           env: Mapping[str, str] | None = None) -> list[subprocess.Popen[str]]:
    """One agent per host, all in one job (a fresh job id and port each call)."""
    port = hosts[0].free_port()
    job = {"DISTRAIN_TEST_JOB": uuid.uuid4().hex[:8], **(env or {})}
    return [start_agent(host, [*rdzv_flags(backend, hosts, host, port, nnodes or str(len(hosts))),
                               "--nproc-per-node", str(nproc), *extra_flags], script, args, job)
            for host in hosts]


def collect(procs: Sequence[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str]]:
    """(exit code, output) of every agent; all of them are killed if one runs past ``timeout``."""
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        outputs = []
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            outputs.append(proc.communicate()[0])
        raise AssertionError(f"agents ran past {timeout}s:\n" + "\n----\n".join(o[-3000:] for o in outputs)) from None
    return results


def stop(procs: Sequence[subprocess.Popen[str]]) -> None:
    """Kill what is left of ``procs`` (a test that failed half-way); reap them."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
