"""``distrain launch --launcher ray`` across two separate hosts (tests/helpers/hosts.py), S3 on a third.

``ray start --head`` runs on host0 and ``ray start --address`` on host1, each bound to its own
address, with Ray's files on its own disk; the launcher runs on host0. Checkpoints go to a real
S3 endpoint (moto's server) on host2: no disk is shared. The module's Ray cluster is stopped by
killing every process of each host (``ray stop`` matches Ray's processes by name on the whole
machine, the other hosts' included: the hosts share this machine's process table).
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PYTHON, REPO, child_env
from tests.helpers.hosts import Host, hosts_or_skip
from tests.helpers.nodes_launch import collect, make_bucket, start_s3, stop
from tests.helpers.ray_harness import describe, processes_mentioning

pytestmark = pytest.mark.ray
SCRIPTS = REPO / "tests" / "scripts"
RAY = str(Path(PYTHON).parent / "ray")
START_BOUND_S = 120
RECOVERY_BOUND_S = 200  # from the kill to the end of the run: start-up on a loaded machine
# Ray's own health check declares a lost node dead after period x threshold; its default
# (3 s x 5) would let a restart see the lost node's CPUs as still there.
SYSTEM_CONFIG = json.dumps({"health_check_period_ms": 500, "health_check_failure_threshold": 4})


@dataclass(slots=True)
class RayHosts:
    hosts: list[Host]
    address: str  # the head's GCS address
    env: dict[str, str]  # what every rank's node has: the S3 endpoint and credentials, OUT_DIR


def node_env(extra: dict[str, str]) -> dict[str, str]:
    """A host's environment: the loopback-only switch the loopback Ray tests set stays out
    (these nodes have real addresses, and Ray refuses a multi-node cluster with it)."""
    env = child_env(extra)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _ray_start(host: Host, temp_dir: str, env: dict[str, str], *args: str) -> None:
    result = host.run([RAY, "start", f"--node-ip-address={host.address}", "--num-cpus=2",
                       "--object-store-memory=100000000", f"--temp-dir={temp_dir}",
                       "--disable-usage-stats", *args], node_env(env), timeout=START_BOUND_S)
    assert result.returncode == 0, f"ray start on {host.name}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def ray_hosts() -> Iterator[RayHosts]:
    # One short path (Ray's socket paths are length-limited) with each host's own disk mounted
    # over it inside that host.
    temp_dir = tempfile.mkdtemp(prefix="drn-", dir="/tmp")
    try:
        with hosts_or_skip(3) as hosts:
            server, s3_env = start_s3(hosts[2])
            try:
                # Token authentication as `ray start` has it on: the token given to every node and
                # the driver by the environment (not ~/.ray, which these hosts would share).
                env = {**s3_env, "OUT_DIR": str(hosts[0].workdir / "out"), "RAY_AUTH_MODE": "token",
                       "RAY_AUTH_TOKEN": secrets.token_hex(32)}
                for host in hosts[:2]:
                    (host.disk / "ray").mkdir()
                    host.run(["mount", "--bind", str(host.workdir / "ray"), temp_dir], check=True)
                port = hosts[0].free_port()
                _ray_start(hosts[0], temp_dir, env, "--head", f"--port={port}",
                           "--include-dashboard=false", f"--system-config={SYSTEM_CONFIG}")
                address = f"{hosts[0].address}:{port}"
                # Returns once host1's node is registered with the head (the first test's fixed-size
                # reservation would wait for it anyway).
                _ray_start(hosts[1], temp_dir, env, f"--address={address}")
                yield RayHosts(hosts=hosts, address=address, env=env)
            finally:
                for host in hosts[:2]:
                    host.kill_all()  # the raylet, GCS, workers: what `ray stop` would stop, here only
                for host in hosts[:2]:
                    host.wait_no_processes()
                hosts[2].stop_daemon(server)
        leftovers = processes_mentioning(temp_dir)  # a raylet, GCS or worker that escaped its host
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not leftovers, f"Ray processes outlived the hosts: {describe(leftovers)}"


def ray_launch(ray_hosts: RayHosts, *args: str) -> Any:
    head = ray_hosts.hosts[0]
    return head.popen([PYTHON, "-m", "distrain", "launch", "--launcher", "ray", "--address",
                       ray_hosts.address, *args], node_env(ray_hosts.env), cwd=REPO)


def rank_reports(hosts: list[Host]) -> dict[int, dict[str, Any]]:
    found = {}
    for host in hosts:
        for path in (host.disk / "out").glob("rank-*.json"):
            report = json.loads(path.read_text())
            found[report["rank"]] = {**report, "disk": host.name}
    return found


@pytest.mark.timeout(300)
def test_four_ranks_on_two_ray_hosts_form_one_world(ray_hosts: RayHosts) -> None:
    hosts = ray_hosts.hosts
    launcher = ray_launch(ray_hosts, "--nnodes", "2", "--nproc-per-node", "2",
                          str(SCRIPTS / "nodes_probe.py"))
    try:
        [(code, out)] = collect([launcher], timeout=START_BOUND_S)
    finally:
        stop([launcher])
    assert code == 0, out[-4000:]
    reports = rank_reports(hosts[:2])
    assert sorted(reports) == [0, 1, 2, 3], out[-3000:]
    assert {r["world_size"] for r in reports.values()} == {4}
    assert {r["sum"] for r in reports.values()} == {10.0}  # 1+2+3+4: a real all-reduce
    assert {r["host"] for r in reports.values()} == {"host0", "host1"}
    for report in reports.values():  # each rank wrote to the disk of the host it ran on
        assert report["host"] == report["disk"]
    node_ranks = {host: {r["node_rank"] for r in reports.values() if r["host"] == host}
                  for host in ("host0", "host1")}
    assert sorted(node_ranks.values(), key=min) == [{0}, {1}], node_ranks  # one node rank per host


def steps_logged(hosts: list[Host]) -> list[dict[str, Any]]:
    found = []
    for host in hosts:
        for path in (host.disk / "out").glob("steps-*.jsonl"):
            found += [{**json.loads(line), "on": host.name}
                      for line in path.read_text().splitlines() if line.strip()]
    return found


@pytest.mark.timeout(400)
def test_losing_a_ray_host_restarts_the_group_on_the_survivor(ray_hosts: RayHosts) -> None:
    """Runs last: host1's Ray is gone afterwards."""
    hosts = ray_hosts.hosts
    store = make_bucket(hosts[0], ray_hosts.env, f"rayelastic-{secrets.token_hex(3)}")
    launcher = ray_launch(ray_hosts, "--nnodes", "1:2", "--nproc-per-node", "2",
                          "--max-restarts", "1", str(SCRIPTS / "nodes_train.py"), "--steps", "24",
                          "--global-batch", "16", "--micro", "2", "--ckpt-every", "2",
                          "--pace", "0.25", "--ckpt", f"{store}/run")
    try:
        deadline = time.monotonic() + START_BOUND_S
        while not any(r["step"] >= 6 and r["world"] == 4 for r in steps_logged(hosts[:2])):
            assert launcher.poll() is None and time.monotonic() < deadline, \
                launcher.communicate()[0][-4000:] if launcher.poll() is not None else "no step 6"
            time.sleep(0.1)
        killed_at = time.monotonic()
        assert hosts[1].kill_all(), "nothing ran on host1"
        # 68-94 s here at load average ~20; a restart under heavier load takes longer.
        [(code, out)] = collect([launcher], timeout=RECOVERY_BOUND_S)
        finished = time.monotonic() - killed_at
    finally:
        stop([launcher])
    assert code == 0, out[-4000:]
    assert "restarting the group (restart 1 of 1)" in out and "attempt 1: 2 workers" in out, out[-4000:]
    after = [r for r in steps_logged(hosts[:1]) if r["world"] == 2]
    assert after and max(r["step"] for r in after) == 24, out[-3000:]
    assert (hosts[0].disk / "out" / "final.pt").exists()
    print(f"host1 killed; the survivor finished {finished:.1f} s later")
