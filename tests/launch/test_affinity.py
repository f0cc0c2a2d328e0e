"""CPU workers pinned to cores of their own (``--cpu-affinity``, distrain/affinity.py)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from distrain.affinity import AFFINITY_ENV, cores_for, format_cpus, parse_cpus, physical_cores, pin_worker
from tests.helpers import PYTHON, REPO, assert_ok, child_env, distrain, run_cmd

PROBE = REPO / "tests" / "scripts" / "affinity_probe.py"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="CPU affinity by thread id: Linux only")


def test_cpu_lists_round_trip() -> None:
    assert format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert parse_cpus("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}
    assert parse_cpus(format_cpus(range(64))) == set(range(64))
    assert format_cpus(()) == "" and parse_cpus("") == frozenset()
    for bad in ("a", "3-1", "-1"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


@pytest.mark.parametrize("ranks", [2, 3, 4, 5, 8])
def test_shares_are_disjoint_cover_every_cpu_and_differ_by_at_most_one(ranks: int) -> None:
    cpus = range(8)
    shares = [cores_for(rank, ranks, cpus, [(cpu,) for cpu in cpus]) for rank in range(ranks)]
    assert all(share for share in shares)
    assert sorted(cpu for share in shares if share for cpu in share) == list(cpus)
    sizes = [len(share) for share in shares if share]
    assert max(sizes) - min(sizes) <= 1
    assert all(max(a) < min(b) for a, b in itertools.pairwise(shares) if a and b)  # contiguous, in rank order


def test_hyperthread_siblings_stay_with_one_rank(tmp_path: Path) -> None:
    # 4 cores x 2 threads, numbered as Linux usually does: cpu N and cpu N+4 share a core.
    for cpu in range(8):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        topology.joinpath("thread_siblings_list").write_text(f"{cpu % 4},{cpu % 4 + 4}\n")
    cores = physical_cores(range(8), sysfs=tmp_path)
    assert cores == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert cores_for(0, 2, range(8), cores) == {0, 1, 4, 5}
    assert cores_for(1, 2, range(8), cores) == {2, 3, 6, 7}
    # More ranks than cores: single CPUs, still disjoint.
    assert [cores_for(rank, 8, range(8), cores) for rank in range(8)] == [{cpu} for cpu in range(8)]


def test_nothing_to_pin() -> None:
    assert cores_for(0, 1, range(8)) is None  # one rank per node keeps every CPU
    assert cores_for(0, 3, {0, 1}, [(0,), (1,)]) is None  # fewer CPUs than ranks: no share to give
    assert pin_worker(0, 2, environ={}) is None  # not under distrain launch (torchrun, Ray)
    assert pin_worker(0, 2, environ={AFFINITY_ENV: ""}) is None  # --cpu-affinity none
    assert pin_worker(0, 2, environ={AFFINITY_ENV: "not a list"}) is None


def _probe(tmp_path: Path, *flags: str, prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Launch the probe on 2 ranks (after ``prefix``, e.g. taskset); each rank's report."""
    out = tmp_path / "out"
    out.mkdir()
    command = [*prefix, PYTHON, "-m", "distrain", "launch", "--nproc-per-node", "2", *flags, str(PROBE)]
    result = run_cmd(command, timeout=120, env=child_env({"OUT_DIR": str(out)}))
    assert_ok(result)
    return [json.loads((out / f"affinity-{rank}.json").read_text()) for rank in (0, 1)]


needs_two_cpus = pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2,
                                    reason="pinning two ranks needs at least two CPUs")


@linux_only
@needs_two_cpus
@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_each_rank_trains_on_its_own_cores(tmp_path: Path, start_method: str) -> None:
    node = sorted(os.sched_getaffinity(0))
    reports = _probe(tmp_path, "--start-method", start_method)
    for rank, report in enumerate(reports):
        expected = sorted(cores_for(rank, 2, node) or ())
        assert expected and report["node"] == format_cpus(node)
        # The main thread, a thread started before ddp.init and one started after: all pinned.
        assert report["main"] == report["early"] == report["late"] == expected, report
        assert report["background"] == node  # a checkpoint writer's thread is not pinned
    assert not set(reports[0]["main"]) & set(reports[1]["main"])


@linux_only
@needs_two_cpus
@pytest.mark.timeout(120)
def test_cpu_affinity_none_leaves_placement_to_the_scheduler(tmp_path: Path) -> None:
    node = sorted(os.sched_getaffinity(0))
    for report in _probe(tmp_path, "--cpu-affinity", "none"):
        assert report["main"] == report["early"] == report["late"] == node
        assert report["node"] == ""


@linux_only
@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) not installed")
def test_a_launcher_limited_to_one_cpu_pins_nothing(tmp_path: Path) -> None:
    first = min(os.sched_getaffinity(0))
    for report in _probe(tmp_path, prefix=("taskset", "-c", str(first))):
        assert report["main"] == report["late"] == [first]
        assert report["node"] == str(first)


def test_an_unknown_mode_is_one_line_and_exit_2() -> None:
    result = distrain("launch", "--cpu-affinity", "numa", "--nproc-per-node", "2", str(PROBE))
    assert result.returncode == 2
    assert "--cpu-affinity" in result.stderr and "numa" in result.stderr and "auto or none" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
