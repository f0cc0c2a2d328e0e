"""Rendezvous across separate hosts (own network, name and disk): static and c10d, 2 and 3 hosts."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.helpers import ABORT_LINE, REPO
from tests.helpers.hosts import Host, hosts_or_skip
from tests.helpers.nodes_launch import collect, launch, stop

PROBE = str(REPO / "tests" / "scripts" / "nodes_probe.py")


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    with hosts_or_skip(3) as made:
        yield made


@pytest.mark.timeout(240)
# c10d across 2 hosts (2 ranks each) also runs in every test of test_nodes_elastic.py.
@pytest.mark.parametrize(("backend", "nhosts", "nproc"), [("static", 2, 2), ("static", 3, 1), ("c10d", 3, 1)])
def test_ranks_and_all_reduce_across_hosts(hosts: list[Host], backend: str, nhosts: int, nproc: int) -> None:
    used = hosts[:nhosts]
    for host in used:
        host.run(["rm", "-rf", "out"], check=True)
    procs = launch(used, backend, PROBE, nproc=nproc)
    try:
        results = collect(procs, timeout=180)
    finally:
        stop(procs)
    for (code, out), host in zip(results, used, strict=True):
        assert code == 0 and ABORT_LINE not in out, f"{host.name} rc={code}\n{out[-3000:]}"
    world = nhosts * nproc
    reports = {}
    for node_rank, host in enumerate(used):
        for path in (host.disk / "out").glob("rank-*.json"):  # each host wrote to its own disk only
            report = json.loads(path.read_text())
            assert report["host"] == host.name and report["node_rank"] == node_rank
            reports[report["rank"]] = report
    assert sorted(reports) == list(range(world))
    for rank, report in reports.items():
        assert report["world_size"] == world and report["local_rank"] == rank % nproc
        assert report["node_rank"] == rank // nproc
        assert report["sum"] == world * (world + 1) / 2  # a real all-reduce over every host
