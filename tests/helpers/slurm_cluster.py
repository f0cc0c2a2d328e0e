"""A real SLURM cluster for tests: munged, slurmctld and one slurmd per node, all under one temp dir.

Debian's slurm-wlm 22.05 daemons with a generated ``slurm.conf`` (free ports, state, spool, pid
and log files under the temp dir, ``proctrack/linuxproc``: no cgroups). The daemons run as real
daemons (they fork away from the test process); :func:`slurm_cluster` cancels every job, stops
the daemons, waits for them to exit and removes the directory, also when a test failed.

Packages missing: installed with apt when running as root (as CI does), otherwise
:func:`slurm_unavailable` says why and the tests skip with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.helpers import child_env, free_port

PACKAGES = ("slurmctld", "slurmd", "munge", "slurm-client")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True, slots=True, kw_only=True)
class SlurmNode:
    """One slurmd: its node name, the address slurmctld reaches it at, how to run inside it."""

    name: str
    addr: str = "127.0.0.1"
    # argv prefix that runs a command on this node's host (e.g. inside its namespaces); () = here
    prefix: tuple[str, ...] = ()


@dataclass(slots=True, kw_only=True)
class SlurmCluster:
    root: Path
    conf: Path
    nodes: tuple[SlurmNode, ...]
    controller: str
    # where slurmctld runs and the clients (sbatch, scontrol, ...) are run from
    client_prefix: tuple[str, ...] = ()
    pids: dict[str, int] = field(default_factory=dict)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A client environment: this cluster's config, the venv's ``distrain`` and python first."""
        env = child_env(extra)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def run(self, *argv: str, timeout: float = 60, check: bool = True,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.client_prefix, *argv], capture_output=True, text=True,
                                timeout=timeout, env=self.env(env), check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def sbatch(self, script: str | Path, *args: str, options: Sequence[str] = (),
               cwd: Path, env: Mapping[str, str] | None = None) -> str:
        """Submit ``script`` from ``cwd``; the job id."""
        prefix = [a if not a.startswith("--wdns=") else f"--wdns={cwd}" for a in self.client_prefix]
        result = subprocess.run([*prefix, "sbatch", "--parsable", *options, str(script), *args],
                                capture_output=True, text=True, timeout=60,
                                cwd=None if self.client_prefix else cwd,  # nsenter --wdns
                                env=self.env(env), check=False)
        if result.returncode != 0:
            raise AssertionError(f"sbatch failed: {result.stderr}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (no accounting here: sacct is disabled)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields: dict[str, str] = {}
        for item in text.split():
            key, sep, value = item.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait_state(self, job_id: str, states: set[str], *, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}")
            time.sleep(0.2)  # poll interval, bounded by the deadline above

    def wait_ended(self, job_id: str, *, timeout: float = 240) -> dict[str, str]:
        return self.wait_state(job_id, ENDED, timeout=timeout)

    def wait_idle(self, timeout: float = 60) -> None:
        """Every node idle (up and registered with slurmctld)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
            states = dict(line.split() for line in out if line.strip())
            if len(states) == len(self.nodes) and set(states.values()) == {"idle"}:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))
                raise AssertionError(f"nodes not idle after {timeout}s: {states}\n{logs}")
            time.sleep(0.2)


def slurm_unavailable() -> str | None:
    """None when SLURM can run here (installing it with apt as root if missing), else why not."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
            result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env,
                                    check=False)
            if result.returncode != 0:
                return f"{' '.join(argv)} failed: {result.stderr.strip()[-300:]}"
        missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing) and this is not root with "
                f"apt-get: apt-get install {' '.join(PACKAGES)}")
    return None


def _conf(root: Path, nodes: Sequence[SlurmNode], controller: str, controller_addr: str,
          spool: str) -> str:
    cpus = os.cpu_count() or 1
    lines = [
        "ClusterName=distraintest",
        f"SlurmctldHost={controller}({controller_addr})",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long a requeued job waits before it may start (default 120 s)
        f"AuthInfo=socket={root}/munge/socket,cred_expire=10",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "JobRequeue=1",
        # the main scheduling pass runs every 60 s by default: a requeued job whose begin time
        # has come waits for it (nothing else wakes the scheduler)
        "SchedulerParameters=sched_interval=2",
        "KillWait=30",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={spool or root / 'spool'}/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
    ]
    lines += [f"NodeName={n.name} NodeAddr={n.addr} CPUs={cpus} RealMemory=1000 State=UNKNOWN"
              for n in nodes]
    lines.append("PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _wait_pidfile(path: Path, what: str, root: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(path.read_text().strip())
            if psutil.pid_exists(pid):
                return pid
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-2000:] for p in (root / "log").glob("*.log"))
            raise AssertionError(f"{what} wrote no pid file {path} in {timeout}s\n{logs}")
        time.sleep(0.1)


def _start(argv: Sequence[str], root: Path) -> None:
    """Run a daemon's start command (it forks itself away and returns)."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "SLURM_CONF": str(root / "slurm.conf")})
    if result.returncode != 0:
        logs = "\n".join(p.read_text()[-2000:] for p in (root / "log").glob("*.log"))
        raise AssertionError(f"{' '.join(argv)} failed: {result.stdout}{result.stderr}\n{logs}")


def _mount_cgroups() -> str:
    """Shell that mounts this machine's cgroup hierarchies at /sys/fs/cgroup (in a host's own
    mount namespace: a bind of the outer tree is refused across namespaces)."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    if any(m[1] == "/sys/fs/cgroup" and m[2] == "cgroup2" for m in mounts):
        return "mount -t cgroup2 cgroup2 /sys/fs/cgroup"
    steps = ["mount -t tmpfs cgroup /sys/fs/cgroup"]
    steps += [f"mkdir -p {m[1]} && mount -t {m[2]} -o {m[3]} cgroup {m[1]}" for m in mounts
              if m[2] in ("cgroup", "cgroup2") and m[1].startswith("/sys/fs/cgroup/")]
    return " && ".join(steps)


def _stop(pids: Mapping[str, int], timeout: float = 30) -> None:
    """SIGTERM each daemon, wait for it to exit (they take a second or two), then SIGKILL."""
    procs = []
    for pid in pids.values():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def _job_processes(root: Path) -> list[psutil.Process]:
    """Processes a job left (slurmstepd and its tasks carry this cluster's SLURM_CONF)."""
    found = []
    conf = str(root / "slurm.conf")
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get("SLURM_CONF") == conf:
                found.append(proc)
    return found


def _cancel_all(cluster: SlurmCluster, timeout: float = 60) -> None:
    cluster.run("scancel", "--full", "--user", "root", check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cluster.run("squeue", "-h", "-o", "%i %T", check=False).stdout.strip()
        if not out:
            return
        time.sleep(0.2)


@contextlib.contextmanager
def slurm_cluster(nodes: Sequence[SlurmNode] | None = None, *, controller: SlurmNode | None = None,
                  spool: str = "") -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and a slurmd per node; stop and remove all of it on exit.

    By default one node, this machine, with slurmctld beside it. For separate hosts, pass their
    nodes and the one ``controller`` that runs slurmctld (its name must be that host's name) and
    the clients; ``spool`` a path each host sees on its own private disk. munged runs here: its
    socket is a file every host's mount namespace sees.
    """
    nodes = tuple(nodes or (SlurmNode(name=socket.gethostname()),))
    controller = controller or SlurmNode(name=socket.gethostname())
    root = Path(tempfile.mkdtemp(prefix="slurm-"))
    os.chmod(root, 0o755)  # munge wants every directory above its socket searchable
    for sub in ("munge", "state", "spool", "run", "log"):
        (root / sub).mkdir(mode=0o755)
    # slurmctld only runs where the host name is SlurmctldHost's
    cluster = SlurmCluster(root=root, conf=root / "slurm.conf", nodes=nodes,
                           controller=controller.name, client_prefix=controller.prefix)
    try:
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        cluster.conf.write_text(_conf(root, nodes, controller.name, controller.addr, spool))
        munge = root / "munge"
        _start(["munged", "--force", f"--socket={munge}/socket", f"--key-file={key}",
                f"--log-file={root}/log/munged.log", f"--pid-file={munge}/munged.pid",
                f"--seed-file={munge}/seed"], root)
        cluster.pids["munged"] = _wait_pidfile(munge / "munged.pid", "munged", root)
        _start([*controller.prefix, "slurmctld", "-f", str(cluster.conf)], root)
        cluster.pids["slurmctld"] = _wait_pidfile(root / "run/slurmctld.pid", "slurmctld", root)
        for node in nodes:
            # slurmd makes its spool directory, but not the ones above it (a host's own disk)
            _start([*node.prefix, "mkdir", "-p", f"{spool or root / 'spool'}/{node.name}"], root)
            # slurmd reads the cgroup tree even with proctrack/linuxproc; `ip netns exec` gave a
            # host a fresh /sys without it, so the host gets this machine's (its own mounts only).
            slurmd = f"exec slurmd -f {cluster.conf} -N {node.name}"
            if node.prefix:
                slurmd = f"mountpoint -q /sys/fs/cgroup || {{ {_mount_cgroups()}; }}; {slurmd}"
            _start([*node.prefix, "sh", "-c", slurmd], root)
            cluster.pids[f"slurmd-{node.name}"] = _wait_pidfile(
                root / f"run/slurmd-{node.name}.pid", f"slurmd {node.name}", root)
        cluster.wait_idle()
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            _cancel_all(cluster)
        order = [k for k in cluster.pids if k.startswith("slurmd")] + ["slurmctld", "munged"]
        _stop({k: cluster.pids[k] for k in order if k in cluster.pids})
        leftovers = _job_processes(root)
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(leftovers, timeout=10)
        shutil.rmtree(root, ignore_errors=True)
