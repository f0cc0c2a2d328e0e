"""The separate-hosts harness itself: names, addresses, private disks, partitions, teardown."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import PYTHON
from tests.helpers.hosts import Host, hosts_or_skip, netns_names

CONNECT = ("import socket, sys\n"
           "try:\n"
           "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
           "except OSError as e:\n"
           "    print(type(e).__name__); sys.exit(1)\n")
SERVE = ("import socket, sys\n"
         "s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen()\n"
         "print(s.getsockname()[1], flush=True)\n"
         "while True:\n"
         "    s.accept()[0].close()\n")


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    with hosts_or_skip(2) as made:
        yield made


def test_each_host_has_its_name_address_and_resolves_the_others(hosts: list[Host]) -> None:
    for host in hosts:
        out = host.run([PYTHON, "-c", "import socket; print(socket.gethostname(),"
                        " socket.gethostbyname('host0'), socket.gethostbyname('host1'))"],
                       check=True).stdout.split()
        assert out == [host.name, "10.211.0.1", "10.211.0.2"]
        assert host.address == f"10.211.0.{host.index + 1}"


def test_disks_are_private_at_the_same_path(hosts: list[Host]) -> None:
    for host in hosts:
        host.run(["sh", "-c", f"echo {host.name} > mine"], check=True)
    for host in hosts:
        assert (host.disk / "mine").read_text().strip() == host.name
        seen = host.run(["cat", str(host.workdir / "mine")], check=True).stdout.strip()
        assert seen == host.name
        others = host.run(["ls", "-A", str(host.disk.parent)], check=True).stdout.split()
        assert others == []  # the other hosts' disks are hidden
    assert Path(hosts[0].workdir).is_dir() and not (hosts[0].workdir / "mine").exists()


def test_shared_memory_is_private_to_each_host(hosts: list[Host]) -> None:
    name = f"distrain-test-{os.getpid()}"
    hosts[0].run(["sh", "-c", f"echo here > /dev/shm/{name}"], check=True)
    assert hosts[0].run(["cat", f"/dev/shm/{name}"], check=True).stdout.strip() == "here"
    assert hosts[1].run(["ls", f"/dev/shm/{name}"]).returncode != 0
    assert not (Path("/dev/shm") / name).exists()  # nor on this machine


def test_link_down_partitions_and_kill_all_stops_everything(hosts: list[Host]) -> None:
    server = hosts[1].popen([PYTHON, "-c", SERVE])
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        reach = [PYTHON, "-c", CONNECT, "host1", port, "3"]
        assert hosts[0].run(reach).returncode == 0
        hosts[1].link_down()
        try:
            cut = hosts[0].run(reach)
            assert cut.returncode == 1 and cut.stdout.strip() in ("TimeoutError", "OSError")
            assert server.poll() is None  # the partitioned host's process still runs
        finally:
            hosts[1].link_up()
        assert hosts[0].run(reach).returncode == 0
    finally:
        killed = hosts[1].kill_all()
        server.wait(timeout=30)
    assert server.pid in killed and hosts[1].pids() == []


def test_bandwidth_cap_is_a_token_bucket_on_the_host_link(hosts: list[Host]) -> None:
    hosts[0].limit_bandwidth("8mbit")
    shown = subprocess.run(["tc", "-n", hosts[0].netns, "qdisc", "show", "dev", "eth0"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    assert "tbf" in shown and "8Mbit" in shown, shown


def test_teardown_removes_namespaces_and_disks() -> None:
    with hosts_or_skip(1) as made:
        host = made[0]
        sleeper = host.popen(["sleep", "600"], stdout=subprocess.DEVNULL)
        disk, netns = host.disk, host.netns
        assert netns in netns_names()
    assert sleeper.wait(timeout=30) != 0
    assert netns not in netns_names() and not disk.exists()
