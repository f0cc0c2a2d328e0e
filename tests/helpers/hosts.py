"""Separate hosts on this machine, for multi-node tests: own network, own name, own disk.

``make_hosts(n)`` yields ``n`` :class:`Host` objects. Each host is

* a network namespace (``ip netns``) with one interface ``eth0`` holding its own address
  (``10.211.0.1``, ``10.211.0.2``, ...), plugged into a bridge that lives in a further namespace
  of its own, so every address exists only inside namespaces made here and nothing is routed out;
  the same subnet in two harnesses never meets because each harness has its own bridge;
* a UTS namespace with its own hostname (``host0``, ``host1``, ...) and a mount namespace with a
  hosts file naming every host bind-mounted over ``/etc/hosts`` (torch's c10d rendezvous picks the
  node that serves the store by matching the endpoint to the machine's own name);
* a private working directory mounted at the same path (:attr:`Host.workdir`) on every host, with
  the other hosts' directories hidden: no disk is shared between hosts; and a ``/dev/shm`` of its
  own (a tmpfs that goes with the host's last process). From the test process
  (outside every host) a host's directory is :attr:`Host.disk`.

Commands run inside a host with :meth:`Host.run` / :meth:`Host.popen` (``nsenter`` into the host's
namespaces); :meth:`Host.daemon` starts a background server there that is no child of the test.
:meth:`Host.link_down` / :meth:`Host.link_up` partition a host (its processes keep running,
unreachable); :meth:`Host.kill_all` SIGKILLs every process on it; :meth:`Host.limit_bandwidth`
caps its link with ``tc tbf``. On exit, even after a failure, every process on the hosts is killed
and every namespace, mount and directory is removed.

Namespaces need root; where the machine refuses them ``make_hosts`` raises :class:`HostsUnavailable`
with the reason (``hosts_or_skip`` turns that into a pytest skip that prints it).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.211.0"
PREFIX = "dthosts"  # every namespace this module makes starts with this
_TIMEOUT = 30.0


class HostsUnavailable(RuntimeError):
    """This machine cannot make namespaces (not root, no ``ip``/``unshare``, or refused)."""


@dataclass(slots=True)
class Host:
    """One host: a name the other hosts resolve, an address, a private working directory."""

    index: int
    name: str
    address: str
    workdir: Path  # the same path on every host, each host sees its own disk there
    disk: Path  # where this host's working directory lies, seen from the test process
    netns: str
    hub: str  # the namespace holding the bridge
    holder_pid: int  # a process in the host's namespaces for as long as the host lives

    def command(self, argv: Sequence[str], *, cwd: str | Path | None = None) -> list[str]:
        """``argv`` wrapped to run inside this host (network, UTS and mount namespaces)."""
        wd = str(cwd or self.workdir)
        return ["nsenter", f"--target={self.holder_pid}", "--net", "--uts", "--mount",
                f"--wdns={wd}", "--", *argv]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The test process's environment with ``TMPDIR`` on this host's own disk, plus ``extra``."""
        env = dict(os.environ)
        env["TMPDIR"] = str(self.workdir / "tmp")
        env.update(extra or {})
        return env

    def popen(self, argv: Sequence[str], env: Mapping[str, str] | None = None, *,
              cwd: str | Path | None = None, stdout: int | None = subprocess.PIPE,
              stderr: int | None = subprocess.STDOUT) -> subprocess.Popen[str]:
        """Start ``argv`` inside this host (its own session); ``env`` defaults to :meth:`env`."""
        return subprocess.Popen(self.command(argv, cwd=cwd), env=dict(env) if env else self.env(),
                                stdout=stdout, stderr=stderr, text=True, start_new_session=True)

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None, *,
            cwd: str | Path | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host to the end (killed with its session on timeout)."""
        proc = self.popen(argv, env, cwd=cwd, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{self.name}: timed out after {timeout}s: {argv}\n{out}\n{err}") from None
        result = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.name}: {argv} exited {proc.returncode}\n{out}\n{err}")
        return result

    def daemon(self, argv: Sequence[str], env: Mapping[str, str] | None = None, *,
               cwd: str | Path | None = None, log: str = "daemon.log") -> int:
        """Start ``argv`` in the background on this host, detached from the test process (not its
        child: fine in module-scoped fixtures); output to ``log`` in the workdir. Returns its pid;
        stop it with :meth:`stop_daemon`, :meth:`kill_all`, or leave it to the teardown."""
        line = " ".join(shlex.quote(a) for a in argv)
        script = f"{line} </dev/null >>{shlex.quote(str(self.workdir / log))} 2>&1 & echo $!"
        return int(self.run(["sh", "-c", script], env, cwd=cwd, check=True, timeout=_TIMEOUT).stdout)

    def stop_daemon(self, pid: int, timeout: float = _TIMEOUT) -> None:
        """SIGKILL a process started with :meth:`daemon` and wait until it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while pid in self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def free_port(self) -> int:
        """A TCP port that was free on this host a moment ago."""
        probe = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
        return int(self.run(["python3", "-c", probe], check=True, timeout=_TIMEOUT).stdout)

    def pids(self) -> list[int]:
        """Every process on this host except the namespace holder."""
        return [p for p in netns_pids(self.netns) if p != self.holder_pid]

    def kill_all(self, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process on this host (not the holder); returns their pids."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def wait_no_processes(self, timeout: float = _TIMEOUT) -> None:
        """Wait until nothing but the holder runs on this host."""
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: processes still running: {self.pids()}")
            time.sleep(0.05)

    def link_down(self) -> None:
        """Unplug this host from the bridge: its processes run on, unreachable."""
        _ip("-n", self.hub, "link", "set", f"v{self.index}", "down")

    def link_up(self) -> None:
        _ip("-n", self.hub, "link", "set", f"v{self.index}", "up")

    def limit_bandwidth(self, rate: str = "10mbit") -> None:
        """Cap what this host sends (``tc`` token bucket), e.g. ``"10mbit"``."""
        subprocess.run(["tc", "-n", self.netns, "qdisc", "replace", "dev", "eth0", "root", "tbf",
                        "rate", rate, "burst", "32kbit", "latency", "400ms"], check=True,
                       capture_output=True, timeout=_TIMEOUT)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_TIMEOUT)
    if result.returncode != 0:
        raise HostsUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def netns_pids(netns: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                            timeout=_TIMEOUT)
    return [int(p) for p in result.stdout.split()]


def netns_names() -> list[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=_TIMEOUT)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _check_machine() -> None:
    if os.geteuid() != 0:
        raise HostsUnavailable("separate hosts need root (network, UTS and mount namespaces)")
    if shutil.which("ip") is None and shutil.which("apt-get") is not None:
        # A clean CI image as root: install iproute2 (ip, tc) the first time it is needed.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "iproute2"], capture_output=True, timeout=300)
    missing = [tool for tool in ("ip", "unshare", "nsenter", "mount") if shutil.which(tool) is None]
    if missing:
        raise HostsUnavailable(f"separate hosts need {', '.join(missing)} (iproute2, util-linux)")


def sweep_stale() -> None:
    """Delete namespaces a killed earlier run of this module left (their creator is gone)."""
    for name in netns_names():
        parts = name.split("-")
        if parts[0] != PREFIX or len(parts) < 3 or not parts[1].isdigit():
            continue
        if Path(f"/proc/{parts[1]}").exists():
            continue  # its creator still runs: not ours to touch
        for pid in netns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=_TIMEOUT)


def _start_holder(netns: str, name: str, hosts_file: Path, disk: Path, disks: Path,
                  workdir: Path) -> int:
    # The holder gives the host its name, hosts file and private disk, then sleeps in the
    # background: its parent shell exits, so it is no child of the test process (pytest's leak
    # check stays meaningful for module-scoped hosts). Every command on the host enters its
    # namespaces. The other hosts' disks are hidden under a tmpfs. /dev/shm is the host's own
    # tmpfs, gone with its last process, as a machine's memory is: what its processes leave
    # there (multiprocessing's semaphores of a SIGKILLed launcher) is not left on this machine.
    script = (
        "set -e; "
        f"hostname {name}; "
        f"mount --bind {hosts_file} /etc/hosts; "
        f"mount --bind {disk} {workdir}; "
        f"mount -t tmpfs -o size=1m,mode=700 none {disks}; "
        "mount -t tmpfs -o mode=1777 none /dev/shm; "
        "sleep infinity </dev/null >/dev/null 2>&1 & echo $!"
    )
    result = subprocess.run(
        ["ip", "netns", "exec", netns, "unshare", "--mount", "--uts", "--propagation", "private",
         "sh", "-c", script],
        capture_output=True, text=True, timeout=_TIMEOUT, start_new_session=True,
    )
    pid = result.stdout.strip()
    if result.returncode != 0 or not pid.isdigit():
        raise HostsUnavailable(f"could not make host {name}: {result.stderr.strip()}")
    return int(pid)


@contextlib.contextmanager
def make_hosts(n: int, *, root: str | Path | None = None) -> Iterator[list[Host]]:
    """``n`` separate hosts ``host0..host{n-1}`` on ``10.211.0.1..n``; all removed on exit."""
    if not 1 <= n <= 200:
        raise ValueError(f"make_hosts(n={n}): expected 1..200 hosts")
    _check_machine()
    sweep_stale()
    tag = f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    base = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=root))
    hub = f"{tag}-hub"
    made: list[str] = []
    hosts: list[Host] = []
    try:
        names = [f"host{i}" for i in range(n)]
        addresses = [f"{SUBNET}.{i + 1}" for i in range(n)]
        hosts_file = base / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n::1 localhost\n"
                              + "".join(f"{a} {h}\n" for a, h in zip(addresses, names, strict=True)))
        disks, workdir = base / "disks", base / "work"
        workdir.mkdir()
        _ip("netns", "add", hub)
        made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, (name, address) in enumerate(zip(names, addresses, strict=True)):
            netns = f"{tag}-h{i}"
            _ip("netns", "add", netns)
            made.append(netns)
            _ip("-n", hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                "netns", netns)
            _ip("-n", hub, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            disk = disks / name
            (disk / "tmp").mkdir(parents=True)
            holder = _start_holder(netns, name, hosts_file, disk, disks, workdir)
            hosts.append(Host(index=i, name=name, address=address, workdir=workdir, disk=disk,
                              netns=netns, hub=hub, holder_pid=holder))
        yield hosts
    finally:
        _teardown(hosts, made, base)


def _teardown(hosts: list[Host], namespaces: list[str], base: Path) -> None:
    for host in hosts:
        host.kill_all()
    for host in hosts:
        with contextlib.suppress(AssertionError):
            host.wait_no_processes(timeout=10)
    for netns in reversed(namespaces):
        for pid in netns_pids(netns):  # the holders, and anything that escaped kill_all
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + _TIMEOUT
    while any(netns_pids(netns) for netns in namespaces) and time.monotonic() < deadline:
        time.sleep(0.05)
    for netns in reversed(namespaces):
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=_TIMEOUT)
    shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def hosts_or_skip(n: int) -> Iterator[list[Host]]:
    """:func:`make_hosts` for pytest: a machine that refuses namespaces skips, printing why."""
    import sys

    import pytest

    try:
        cm = make_hosts(n)
        hosts = cm.__enter__()
    except HostsUnavailable as error:
        print(f"separate hosts unavailable: {error}", file=sys.stderr)
        pytest.skip(f"separate hosts unavailable: {error}")
    try:
        yield hosts
    except BaseException as error:
        if not cm.__exit__(type(error), error, error.__traceback__):
            raise
    else:
        cm.__exit__(None, None, None)
