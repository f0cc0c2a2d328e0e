"""An FSDP run across two hosts loses one host and resumes from the buddy copy of its shard.

Two separate hosts (tests/helpers/hosts.py), one rank each, no durable checkpoint at all. Each
host keeps its snapshots in a memory directory of its own (``DISTRAIN_SNAPSHOT_DIR`` on the host's
private disk rather than its private ``/dev/shm``: the test reads and wipes it from outside).
Each rank's shard is also sent to its buddy on the other host. Host 1's rank SIGKILLs itself
after a snapshot; every process left on host 1 is killed and its snapshot directory wiped (a
reboot loses ``/dev/shm``). The same command on both hosts (host 1 replaced by a fresh one)
resumes: rank 0 restores its own shard, rank 1 receives its shard from the copy host 0 held,
and the run ends ``torch.equal`` to an uninterrupted run on the same two hosts.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from bench.fault_trials import identical
from tests.helpers import ABORT_LINE, REPO
from tests.helpers.hosts import Host, hosts_or_skip
from tests.helpers.nodes_launch import collect, launch, stop

SCRIPT = str(REPO / "bench" / "workers" / "fault_train.py")
STEPS, KILL_AT = 16, 9


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    with hosts_or_skip(2) as made:
        yield made


def run(hosts: list[Host], name: str, *extra: str, restarts: int = 0) -> list[tuple[int, str]]:
    """fault_train.py under FSDP on both hosts (static node ranks), snapshots after every step."""
    work = hosts[0].workdir
    args = ["--ckpt", str(work / "ckpt"), "--out", str(work / name), "--steps", str(STEPS),
            "--save-every", "0", "--strategy", "fsdp", "--snapshot-every", "1", *extra]
    procs = launch(hosts, "static", SCRIPT, nproc=1, extra_flags=["--max-restarts", str(restarts)],
                   args=args, env={"DISTRAIN_SNAPSHOT_DIR": str(work / "shm")})
    started = time.monotonic()
    try:
        return collect(procs, timeout=150)
    finally:
        stop(procs)
        print(f"{name} {' '.join(extra)}: {time.monotonic() - started:.1f} s")


@pytest.mark.timeout(420)
def test_fsdp_across_two_hosts_resumes_from_the_buddy_copy_after_losing_a_host(hosts: list[Host]) -> None:
    host0, host1 = hosts
    for code, out in run(hosts, "reference"):
        assert code == 0 and ABORT_LINE not in out, out[-3000:]
    assert not list((host0.disk / "shm").glob("distrain-snapshots-*")), "a clean end left snapshots"

    failed = run(hosts, "lost", "--kill-rank", "1", "--kill-at", str(KILL_AT))
    assert all(code != 0 for code, _ in failed), [code for code, _ in failed]
    host1.kill_all()
    host1.wait_no_processes()
    shutil.rmtree(host1.disk / "shm")  # host 1 rebooted: its memory is gone
    [kept] = (host0.disk / "shm").glob("distrain-snapshots-*")
    assert sorted(p.name for p in kept.iterdir() if p.is_dir()) == ["held-00001", "rank-00000"]

    resumed = run(hosts, "lost")
    for code, out in resumed:
        assert code == 0 and ABORT_LINE not in out, "\n----\n".join(o[-3000:] for _, o in resumed)
    line = next((line for line in resumed[0][1].splitlines() if "resumed from" in line), "")
    assert "resumed from snapshot step" in line, resumed[0][1][-3000:]
    step = int(line.rsplit(" ", 1)[1])
    print(f"host 1 lost after step {KILL_AT}'s snapshot started; resumed from snapshot step {step}")
    assert KILL_AT - 3 <= step <= KILL_AT, line
    assert identical(host0.disk / "reference" / "final.pt", host0.disk / "lost" / "final.pt"), \
        f"resumed from step {step}: the final state differs from the uninterrupted run's"
    for host in hosts:
        assert not list((host.disk / "shm").glob("distrain-snapshots-*")), f"{host.name}: snapshots left"
