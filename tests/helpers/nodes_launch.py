"""``distrain launch`` on separate hosts (tests/helpers/hosts.py): start one agent per host, collect them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence

from tests.helpers import PYTHON, REPO, child_env
from tests.helpers.hosts import Host


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
        tails = "\n----\n".join(o[-3000:] for o in outputs)
        raise AssertionError(f"agents ran past {timeout}s:\n{tails}") from None
    return results


def stop(procs: Sequence[subprocess.Popen[str]]) -> None:
    """Kill what is left of ``procs`` (a test that failed half-way); reap them."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def start_s3(host: Host) -> tuple[int, dict[str, str]]:
    """moto's S3 server on ``host`` (its own host): its pid and the AWS_* variables for clients."""
    from tests.helpers.s3server import CREDENTIALS

    ready = host.workdir / "s3-ready"
    port = host.free_port()
    pid = host.daemon([PYTHON, "-m", "tests.helpers.s3server", "--host", "0.0.0.0", "--port", str(port),
                       "--ready", str(ready)], child_env(), cwd=REPO, log="s3.log")
    deadline = time.monotonic() + 60
    while not (host.disk / "s3-ready").exists():
        if pid not in host.pids() or time.monotonic() > deadline:
            host.stop_daemon(pid)
            log = (host.disk / "s3.log").read_text() if (host.disk / "s3.log").exists() else ""
            raise AssertionError(f"S3 server on {host.name} did not start:\n{log[-3000:]}")
        time.sleep(0.05)
    return pid, {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host.name}:{port}"}


def make_bucket(host: Host, env: Mapping[str, str], name: str) -> str:
    """Create bucket ``name`` through the S3 endpoint in ``env``, from ``host``; returns ``s3://name``."""
    code = ("import boto3, os, sys; boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'])"
            ".create_bucket(Bucket=sys.argv[1])")
    host.run([PYTHON, "-c", code, name], child_env(env), check=True, timeout=60)
    return f"s3://{name}"
