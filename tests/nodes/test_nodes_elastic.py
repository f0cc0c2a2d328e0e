"""Nodes leaving and joining a running job on separate hosts, checkpoints on S3 (its own host).

A fixed-size job fails fast naming the lost host; an elastic one (``--nnodes 1:2``) goes on on
the survivor from the last checkpoint, and admits a late host at the next restart, with the same
math throughout (a fixed global batch: weights within 1e-5 of an uninterrupted 4-rank run, every
sample of every epoch taken exactly once)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from distrain.launchers.node_watch import silent_after
from distrain.launchers.recovery import KEEP_ALIVE_INTERVAL_S
from tests.helpers import ABORT_LINE, REPO
from tests.helpers.hosts import Host, hosts_or_skip
from tests.helpers.nodes_launch import collect, launch, make_bucket, rdzv_flags, start_agent, start_s3, stop

TRAIN = str(REPO / "tests" / "scripts" / "nodes_train.py")
LENGTH, GLOBAL, STEPS = 128, 16, 24  # 8 steps an epoch, 3 epochs
RECOVERY_BOUND_S = 20  # the bound: training again within 20 s of a host's loss
ELASTIC = ["--nproc-per-node", "2", "--max-restarts", "3"]
SILENT_AFTER_S = silent_after({})  # the launcher's default: a node silent this long is lost


class Cluster:
    """Two training hosts and an S3 endpoint on a third; AWS_* variables for every rank."""

    def __init__(self, hosts: list[Host], s3_env: dict[str, str]) -> None:
        self.hosts, self.trainers, self.s3_env = hosts, hosts[:2], s3_env
        self._reference: Path | None = None

    def args(self, name: str, *, steps: int = STEPS, pace: float = 0.25, store: str = "") -> list[str]:
        store = store or make_bucket(self.hosts[0], self.s3_env, f"{name}-{uuid.uuid4().hex[:6]}")
        return ["--steps", str(steps), "--global-batch", str(GLOBAL), "--micro", "2", "--ckpt-every", "2",
                "--pace", str(pace), "--ckpt", f"{store}/run"]

    def env(self, name: str) -> dict[str, str]:
        return {**self.s3_env, "OUT_DIR": str(self.hosts[0].workdir / name)}

    def reference(self) -> Path:
        """Final weights of the uninterrupted run: 4 ranks on one host, same script and global batch."""
        if self._reference is None:
            host = self.hosts[0]
            agent = start_agent(host, ["--standalone", "--nproc-per-node", "4"], TRAIN,
                                self.args("reference", pace=0), self.env("reference"))
            [(code, out)] = collect([agent], timeout=240)
            assert code == 0, out[-4000:]
            self._reference = host.disk / "reference" / "final.pt"
        return self._reference


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with hosts_or_skip(3) as hosts:
        server, s3_env = start_s3(hosts[2])
        try:
            yield Cluster(hosts, s3_env)
        finally:
            hosts[2].stop_daemon(server)


def records(host: Host, name: str, pattern: str) -> list[dict[str, Any]]:
    found = []
    for path in sorted((host.disk / name).glob(pattern)):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


def wait_for_step(host: Host, name: str, step: int, procs: list[Any], timeout: float = 120) -> None:
    """Until rank 0 on ``host`` logged ``step`` (fails if an agent ends first)."""
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in records(host, name, "steps-0.jsonl")):
        ended = [p.returncode for p in procs if p.poll() is not None]
        assert not ended and time.monotonic() < deadline, f"agents ended {ended} before step {step}"
        time.sleep(0.05)


def assert_same_math(cluster: Cluster, name: str) -> dict[int, dict[str, Any]]:
    """Weights match the uninterrupted run; each step took GLOBAL samples, each epoch every sample once.

    Returns, per step, what the group that last ran it logged (over all ranks and hosts)."""
    final = torch.load(cluster.hosts[0].disk / name / "final.pt")
    for key, value in torch.load(cluster.reference()).items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-5)
    latest: dict[int, dict[str, Any]] = {}
    for host in cluster.trainers:
        for record in records(host, name, "steps-*.jsonl"):
            seen = latest.get(record["step"])
            if seen is None or (seen["group"] != record["group"] and record["time"] > seen["time"]):
                latest[record["step"]] = {**record, "ids": list(record["ids"])}
            elif seen["group"] == record["group"]:
                seen["ids"] += record["ids"]
    assert sorted(latest) == list(range(1, STEPS + 1))
    for step, record in latest.items():
        assert len(record["ids"]) == len(set(record["ids"])) == GLOBAL, (step, record["ids"])
    for epoch in range(STEPS * GLOBAL // LENGTH):
        taken = [i for r in latest.values() if r["epoch"] == epoch for i in r["ids"]]
        assert sorted(taken) == list(range(LENGTH)), f"epoch {epoch}: not every sample exactly once"
    return latest


@pytest.mark.timeout(240)
def test_fixed_size_job_fails_within_60s_naming_the_killed_host(cluster: Cluster) -> None:
    host0, host1 = cluster.trainers
    procs = launch(cluster.trainers, "c10d", TRAIN, nproc=1, args=cluster.args("fixed", steps=400),
                   env=cluster.env("fixed"))
    try:
        wait_for_step(host0, "fixed", 3, procs)
        killed_at = time.monotonic()
        assert host1.kill_all()
        [(code, out)] = collect(procs[:1], timeout=120)
        took = time.monotonic() - killed_at
    finally:
        stop(procs)
    summary = out[out.find("distrain: the job failed"):]
    assert code != 0 and took < 60, f"rc={code} after {took:.1f}s\n{out[-3000:]}"
    assert f"lost contact with host1 ({host1.address})" in summary.splitlines()[0], summary


@pytest.mark.timeout(480)
def test_a_late_host_joins_then_leaves_and_the_math_is_that_of_4_ranks(cluster: Cluster) -> None:
    """host0 alone (2 ranks) until step 6; host1 arrives and is admitted (4 ranks); host1 is killed
    after step 13, mid-epoch: host0 goes on (2 ranks) from the checkpoint of step 12 and finishes."""
    host0, host1 = cluster.trainers
    port = host0.free_port()
    args = [*cluster.args("elastic"), "--wait-at", "6", "--wait-world", "4"]
    env = cluster.env("elastic")
    flags = [[*rdzv_flags("c10d", cluster.trainers, h, port, "1:2"), *ELASTIC] for h in cluster.trainers]
    procs = [start_agent(host0, flags[0], TRAIN, args, env)]
    try:
        wait_for_step(host0, "elastic", 6, procs)
        procs.append(start_agent(host1, flags[1], TRAIN, args, env))
        wait_for_step(host0, "elastic", 13, procs, timeout=180)
        killed_at = time.time()
        assert host1.kill_all()
        [(code, out)] = collect(procs[:1], timeout=240)
    finally:
        stop(procs)
    assert code == 0 and ABORT_LINE not in out, out[-4000:]
    starts = records(host0, "elastic", "starts.jsonl")
    assert [(s["world"], s["step"]) for s in starts[:2]] == [(2, 0), (4, 6)], starts
    resumed = starts[2]["step"]  # the last checkpoint before the kill: mid-epoch 1
    assert len(starts) == 3 and starts[2]["world"] == 2 and resumed in (12, 14), starts
    latest = assert_same_math(cluster, "elastic")
    assert [latest[step]["world"] for step in (6, 7, resumed, resumed + 1, STEPS)] == [2, 4, 4, 2, 2]
    assert any(r["world"] == 4 for r in records(host1, "elastic", "steps-*.jsonl"))
    recovery = min(r["time"] for step, r in latest.items() if step > resumed) - killed_at
    print(f"survivor trained again {recovery:.1f} s after the kill")
    assert recovery < RECOVERY_BOUND_S


@pytest.mark.timeout(300)
def test_a_partitioned_host_is_noticed_by_the_launcher_without_a_collective_timeout(cluster: Cluster) -> None:
    """host1's link goes down (its processes run on, unreachable) and the script keeps gloo's
    30-minute collective timeout: host0's launcher sees host1's rendezvous heartbeat stop, stops
    its own workers, restarts alone from the last checkpoint and finishes."""
    host0, host1 = cluster.trainers
    procs = launch(cluster.trainers, "c10d", TRAIN, nproc=1, nnodes="1:2", extra_flags=ELASTIC[2:],
                   args=cluster.args("partition", steps=12), env=cluster.env("partition"))
    try:
        wait_for_step(host0, "partition", 5, procs)
        cut_at = time.time()
        host1.link_down()
        [(code, out)] = collect(procs[:1], timeout=200)
    finally:
        host1.link_up()
        host1.kill_all()
        stop(procs)
    assert code == 0 and ABORT_LINE not in out, out[-4000:]
    assert f"distrain: lost node host1: no rendezvous heartbeat for {SILENT_AFTER_S:g} s" in out, out[-4000:]
    starts = records(host0, "partition", "starts.jsonl")
    assert [s["world"] for s in starts] == [2, 1], starts
    again = min(r["time"] for r in records(host0, "partition", "steps-0.jsonl") if r["world"] == 1)
    print(f"survivor trained again {again - cut_at:.1f} s after the link went down")
    assert again - cut_at < SILENT_AFTER_S + KEEP_ALIVE_INTERVAL_S + RECOVERY_BOUND_S


@pytest.mark.timeout(240)
def test_preflight_names_the_host_that_cannot_write_the_store(cluster: Cluster) -> None:
    host0, host1 = cluster.trainers
    port = host0.free_port()
    args = [*cluster.args("preflight", steps=4), "--preflight"]
    good = cluster.env("preflight")
    bad = {**good, "AWS_ENDPOINT_URL": f"http://{cluster.hosts[2].name}:1"}  # host1: a wrong endpoint
    procs = [start_agent(host, rdzv_flags("c10d", cluster.trainers, host, port, "2"), TRAIN, args, env)
             for host, env in ((host0, good), (host1, bad))]
    try:
        results = collect(procs, timeout=180)
    finally:
        stop(procs)
    assert all(code != 0 for code, _ in results)
    line = next(line for line in results[0][1].splitlines() if "PreflightError: " in line)
    assert "preflight: host host1 cannot write the checkpoint store s3://" in line, line
    assert "host0" not in line.split("PreflightError", 1)[1]
    assert not records(host0, "preflight", "steps-*.jsonl")  # before any training step
