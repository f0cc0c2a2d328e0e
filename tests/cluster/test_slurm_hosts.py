"""The sbatch templates across separate hosts under a real SLURM: one slurmd per host.

host0 and host1 (tests/helpers/hosts.py: own network, hostname and private disk) each run a slurmd; host0
also runs slurmctld, and the jobs are submitted from host0. host2 runs the S3 server the
checkpoints go to. Nothing is shared between the hosts' disks, so each job's files are read from
the host that wrote them. One set of hosts, one S3 server and one SLURM cluster serve the module.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import PYTHON, REPO, child_env
from tests.helpers.hosts import Host, hosts_or_skip
from tests.helpers.nodes_launch import make_bucket, start_s3
from tests.helpers.slurm_cluster import SlurmCluster, SlurmNode, slurm_cluster, slurm_unavailable

C10D = REPO / "cluster" / "slurm-c10d.sbatch"
RAY = REPO / "cluster" / "slurm-ray.sbatch"
DIGITS = str(REPO / "examples" / "digits_logging.py")
TRAIN = REPO / "tests" / "scripts" / "slurm_train.py"
TWO_CPU_NODES = ("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    reason = slurm_unavailable()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    with hosts_or_skip(3) as made:
        yield made


@pytest.fixture(scope="module")
def s3_env(hosts: list[Host]) -> Iterator[dict[str, str]]:
    """moto's S3 server on host2; the AWS_* variables a job needs to reach it."""
    server, env = start_s3(hosts[2])
    try:
        yield env
    finally:
        hosts[2].stop_daemon(server)


@pytest.fixture(scope="module")
def cluster(hosts: list[Host]) -> Iterator[SlurmCluster]:
    nodes = [SlurmNode(name=h.name, addr=h.address, prefix=tuple(h.command([]))) for h in hosts[:2]]
    with slurm_cluster(nodes, controller=nodes[0], spool=str(hosts[0].workdir / "slurmd")) as started:
        yield started


def _submit(cluster: SlurmCluster, hosts: list[Host], name: str, *args: str, script: Path = C10D,
            env: dict[str, str] | None = None) -> tuple[str, Path]:
    """Submit a template from a fresh directory (made on every node, as a shared home would be);
    (job id, that directory on host0's disk)."""
    for host in hosts[:2]:
        (host.disk / name).mkdir()
    job_id = cluster.sbatch(script, *args, options=TWO_CPU_NODES, cwd=hosts[0].workdir / name,
                            env={"NPROC_PER_NODE": "1", **(env or {})})
    return job_id, hosts[0].disk / name


def test_c10d_template_trains_digits_across_two_hosts_checkpoints_on_s3(
        cluster: SlurmCluster, hosts: list[Host], s3_env: dict[str, str]) -> None:
    store = make_bucket(hosts[0], s3_env, "digits") + "/job"
    job_id, here = _submit(cluster, hosts, "digits", DIGITS, "--epochs", "1", "--ckpt", store,
                           env=s3_env)  # sbatch passes the AWS_* variables on to every rank
    info = cluster.wait_ended(job_id)
    text = (here / f"distrain-c10d-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "host[0-1]", (info, text)
    assert "world_size  2" in text and "epoch 0: step" in text, text
    assert f"checkpoints: {store}" in text, text
    listing = hosts[0].run([PYTHON, "-m", "distrain", "ckpt", "ls", store], child_env(s3_env),
                           check=True, timeout=60).stdout
    rows = [line.split() for line in listing.splitlines()[1:]]
    # the one epoch's checkpoint (23 steps of 2 x 32 samples), whole, on the store
    assert [(r[1], r[-3], r[-1]) for r in rows] == [("23", "full", "yes")], listing
    for host in hosts[:2]:  # and on no host's disk
        assert not list(host.disk.rglob("step-*")), sorted(host.disk.rglob("step-*"))
    # host1's launcher wrote its rank's log on its own disk, under the same path
    logs = hosts[1].disk / "digits" / "runs" / job_id / "logs"
    assert len(list(logs.rglob("stderr.log"))) == 1, sorted(hosts[1].disk.rglob("*"))


@pytest.mark.timeout(480)
def test_ray_template_starts_ray_on_both_hosts_trains_digits_and_stops_ray(
        cluster: SlurmCluster, hosts: list[Host]) -> None:
    env = {"TMPDIR": str(hosts[0].workdir / "t"),  # Ray's files on each node's own disk
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # tests/helpers.child_env's 0 is for one node
           "RAY_raylet_start_wait_time_s": "120"}  # a loaded 2-core machine starts raylets slowly
    job_id, here = _submit(cluster, hosts, "ray", DIGITS, "--epochs", "1", script=RAY, env=env)
    info = cluster.wait_ended(job_id, timeout=420)
    text = (here / f"distrain-ray-{job_id}.out").read_text()
    print(text)  # the job's output, for docs/slurm.md (pytest -rP shows it)
    ray_logs = "".join(f"\n--- {p}:\n{p.read_text()[-3000:]}" for host in hosts[:2]
                       for p in host.disk.glob(f"ray/runs/{job_id}/ray-*.log"))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text, ray_logs)
    assert "2 Ray nodes up: host0 (10.211.0.1), host1 (10.211.0.2)" in text, text
    assert "distrain: attempt 0: 2 workers" in text and "world_size  2" in text, text
    assert "epoch 0: step 23" in text and "distrain-ray: Ray stopped on host0 host1" in text, text
    for host in hosts[:2]:  # a rank ran on each node: Ray unpacked the script's folder there
        assert list(host.disk.glob("t/ray/session_*/runtime_resources/working_dir_files/*/"
                                   "digits_logging.py")), f"no rank ran on {host.name}"
        assert "Ray runtime started" in (host.disk / "ray" / "runs" / job_id /
                                         f"ray-{host.name}.log").read_text()
    deadline = time.monotonic() + 60  # slurmstepd finishes its bookkeeping after the job state
    while left := _job_processes(hosts[:2], job_id) + _ray_processes(hosts[:2]):
        assert time.monotonic() < deadline, f"left running after the job: {left}"
        time.sleep(0.2)


def test_a_failing_host_ends_the_whole_job_with_the_summary(cluster: SlurmCluster,
                                                            hosts: list[Host]) -> None:
    start = time.monotonic()
    job_id, here = _submit(cluster, hosts, "fail", str(TRAIN), "--steps", "200", "--fail-at", "3")
    info = cluster.wait_ended(job_id)
    text = (here / f"distrain-c10d-{job_id}.out").read_text()
    assert info["JobState"] == "FAILED", (info, text)
    assert "rank 1 fails on purpose at step 3" in text, text  # rank 1 runs on host1
    assert "exit code 1" in text or "exitcode 1" in text, text
    assert time.monotonic() - start < 200, "the job ended without waiting for a timeout"
    deadline = time.monotonic() + 60  # slurmstepd finishes its bookkeeping after the job state
    while left := _job_processes(hosts[:2], job_id):
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


def _ray_processes(hosts: list[Host]) -> list[str]:
    """Ray's processes (raylet, gcs_server, workers, ...) still on any host."""
    found = []
    for host in hosts:
        for pid in host.pids():
            with contextlib.suppress(psutil.Error):
                command = " ".join(psutil.Process(pid).cmdline())
                if "ray" in command.split(" ", 1)[0] or "/ray/" in command:
                    found.append(f"{host.name}: {command[:200]}")
    return found
