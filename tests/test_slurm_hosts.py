"""The sbatch templates across separate hosts under a real SLURM: one slurmd per host.

Each host (tests/hosts.py: own network, hostname and private disk) runs its slurmd; host0 also
runs slurmctld, and the jobs are submitted from host0. Nothing is shared between the hosts' disks,
so each job's files are read from the host that wrote them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO
from tests.hosts import Host, hosts_or_skip
from tests.slurm_cluster import SlurmCluster, SlurmNode, slurm_cluster, slurm_unavailable

C10D = REPO / "cluster" / "slurm-c10d.sbatch"
TRAIN = REPO / "tests" / "scripts" / "slurm_train.py"
TWO_CPU_NODES = ("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    reason = slurm_unavailable()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    with hosts_or_skip(2) as made:
        yield made


@pytest.fixture(scope="module")
def cluster(hosts: list[Host]) -> Iterator[SlurmCluster]:
    nodes = [SlurmNode(name=h.name, addr=h.address, prefix=tuple(h.command([]))) for h in hosts]
    with slurm_cluster(nodes, controller=nodes[0], spool=str(hosts[0].workdir / "slurmd")) as started:
        yield started


def _submit(cluster: SlurmCluster, host0: Host, name: str, *args: str) -> tuple[str, Path]:
    """Submit the c10d template from a fresh directory on host0's disk; (job id, that dir)."""
    (host0.disk / name).mkdir()
    job_id = cluster.sbatch(C10D, *args, options=TWO_CPU_NODES, cwd=host0.workdir / name,
                            env={"NPROC_PER_NODE": "1"})
    return job_id, host0.disk / name


def test_c10d_template_trains_digits_across_two_hosts(cluster: SlurmCluster, hosts: list[Host]) -> None:
    job_id, here = _submit(cluster, hosts[0], "digits", str(REPO / "examples" / "digits_logging.py"),
                           "--epochs", "1")
    info = cluster.wait_ended(job_id)
    text = (here / f"distrain-c10d-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "host[0-1]", (info, text)
    assert "world_size  2" in text and "epoch 0: step" in text, text
    run = here / "runs" / job_id
    assert sorted((run / "ckpt").glob("step-*")), "rank 0 (host0) wrote the checkpoint"
    # host1's launcher wrote its rank's log on its own disk, under the same path
    logs = hosts[1].disk / "digits" / "runs" / job_id / "logs"
    assert len(list(logs.rglob("stderr.log"))) == 1, sorted(hosts[1].disk.rglob("*"))


def test_a_failing_host_ends_the_whole_job_with_the_summary(cluster: SlurmCluster,
                                                            hosts: list[Host]) -> None:
    start = time.monotonic()
    job_id, here = _submit(cluster, hosts[0], "fail", str(TRAIN), "--steps", "200", "--fail-at", "3")
    info = cluster.wait_ended(job_id)
    text = (here / f"distrain-c10d-{job_id}.out").read_text()
    assert info["JobState"] == "FAILED", (info, text)
    assert "rank 1 fails on purpose at step 3" in text, text  # rank 1 runs on host1
    assert "exit code 1" in text or "exitcode 1" in text, text
    assert time.monotonic() - start < 200, "the job ended without waiting for a timeout"
    deadline = time.monotonic() + 60  # slurmstepd finishes its bookkeeping after the job state
    while left := _job_processes(hosts, job_id):
        assert time.monotonic() < deadline, f"left running after the job: {left}"
        time.sleep(0.2)


def _job_processes(hosts: list[Host], job_id: str) -> list[str]:
    """Processes of job ``job_id`` still on any host (its steps carry SLURM_JOB_ID)."""
    found = []
    for host in hosts:
        for pid in host.pids():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.environ().get("SLURM_JOB_ID") == job_id or "slurmstepd" in proc.name():
                    found.append(f"{host.name}: {' '.join(proc.cmdline())}")
    return found
