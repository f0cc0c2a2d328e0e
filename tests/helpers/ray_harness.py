"""Test harness for the Ray launcher tests (tests/ray/test_ray_launch.py): the loopback cluster,
the processes that belong to a test, the launcher run in the background, the local launcher as
two nodes. Imported by the tests; not a script.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from distrain.signals import restored_signal_handlers
from tests.helpers import PYTHON, child_env, free_port, kill_group


class LoopbackCluster:
    """The module's Ray cluster and the processes that belong to it."""

    def __init__(self, temp_dir: str) -> None:
        from ray.cluster_utils import Cluster

        self.temp_dir = temp_dir
        self.cluster = Cluster(initialize_head=True,
                               head_node_args={"num_cpus": 2, "include_dashboard": False})
        self.cluster.add_node(num_cpus=2)
        self.cluster.wait_for_nodes()
        self.address = str(self.cluster.address)
        self.base = self._snapshot()

    def _snapshot(self) -> set[int]:
        return {p.pid for p in psutil.Process().children(recursive=True)}

    def remove_worker_node(self) -> None:
        self.cluster.remove_node(next(iter(self.cluster.worker_nodes)))

    def restore(self) -> None:
        """Back to head + one worker node (after a node-removal test)."""
        while len(self.cluster.worker_nodes) < 1:
            self.cluster.add_node(num_cpus=2)
        self.cluster.wait_for_nodes()
        self.base = self._snapshot()

    def shutdown(self) -> None:
        self.cluster.shutdown()


def processes_mentioning(needle: str) -> list[psutil.Process]:
    """Every process on the machine whose command line contains ``needle``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if needle in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
            found.append(proc)
    return found


def processes_of(temp_dir: str) -> list[psutil.Process]:
    """Every process started under this module's Ray: they inherit ``RAY_TMPDIR``.

    Finds actors, ranks and launchers even once reparented, and nothing of another test run
    (or another helper) on the same machine.
    """
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("RAY_TMPDIR") == temp_dir:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def describe(procs: list[psutil.Process]) -> list[str]:
    described = []
    for proc in procs:
        try:
            described.append(f"{proc.pid}: {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            continue
    return described


def is_idle_ray_worker(proc: psutil.Process) -> bool:
    """A pooled Ray worker with no task (Ray starts and reaps these on its own)."""
    try:
        line = " ".join(proc.cmdline())
    except psutil.Error:
        return True
    return line.startswith("ray::IDLE") or "default_worker.py" in line


class Launcher:
    """``distrain launch --launcher ray`` in the background, its output read line by line."""

    def __init__(self, cluster: LoopbackCluster, *args: str) -> None:
        argv = [PYTHON, "-m", "distrain", "launch", "--launcher", "ray",
                "--address", cluster.address, *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=child_env(), start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                        for s, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def _read(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            self.lines.put(line)

    def wait_for(self, needle: str, count: int, timeout: float) -> None:
        """Block until ``count`` output lines contain ``needle`` (no sleeping)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while seen < count:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"never saw {count}x {needle!r}:\n{self.text()}") from None
            seen += needle in line

    def finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"launcher still running after {timeout}s:\n{self.text()}") from None
        for reader in self.readers:
            reader.join(10)
        return code

    def kill(self) -> None:
        kill_group(self.proc.pid)
        self.proc.wait()

    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)


def local_two_nodes(*script: str) -> None:
    """The local launcher as two nodes of two ranks on this machine (c10d rendezvous)."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [PYTHON, "-m", "distrain", "launch", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
             *script],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
            start_new_session=True)
        for node in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p.pid)
                p.wait()
    for proc, text in zip(procs, outputs):
        assert proc.returncode == 0, text[-3000:]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    temp_dir = tempfile.mkdtemp(prefix="dray-", dir="/tmp")  # short: Ray's socket paths
    try:
        # The in-process head installs Ray's SIGTERM handler (it exits); later tests need theirs.
        with pytest.MonkeyPatch.context() as patch, restored_signal_handlers():
            patch.setenv("RAY_TMPDIR", temp_dir)
            patch.delenv("RAY_ADDRESS", raising=False)
            loopback = LoopbackCluster(temp_dir)
            try:
                yield loopback
            finally:
                loopback.shutdown()
        leftovers = processes_mentioning(temp_dir)
        assert not leftovers, f"Ray processes outlived the cluster: {describe(leftovers)}"
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)  # also when the cluster failed to start


@pytest.fixture(autouse=True)
def no_leaks(cluster: LoopbackCluster) -> Iterator[None]:
    """conftest's leak check for this module: the cluster's own processes are expected
    children; no actor, rank, launcher, process group, thread or variable may outlive a test."""
    env_before = dict(os.environ)
    threads_before = {t.ident for t in threading.enumerate()}
    yield
    env_after = dict(os.environ)
    changed = {k for k in env_before.keys() | env_after.keys()
               if env_before.get(k) != env_after.get(k) and k != "PYTEST_CURRENT_TEST"}
    assert not changed, f"test changed environment variables: {sorted(changed)}"
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized()), "test left a process group"
    deadline = time.monotonic() + 15
    while True:
        left = {p for p in psutil.Process().children(recursive=True) + processes_of(cluster.temp_dir)
                if p.pid not in cluster.base and not is_idle_ray_worker(p)}
        if not left or time.monotonic() > deadline:
            break
        psutil.wait_procs(list(left), timeout=0.5)
    assert not left, f"actor, rank or launcher processes left running: {describe(list(left))}"
    leaked = [t for t in threading.enumerate()
              if t.ident not in threads_before and t.is_alive() and not t.daemon]
    assert not leaked, f"test left threads running: {leaked}"
