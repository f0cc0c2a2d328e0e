"""Fixtures that catch what a test leaks: env vars, a process group, child processes, threads."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

# What launchers and process groups read or write; libraries may set their own caches freely.
WATCHED_PREFIXES = ("RANK", "LOCAL_", "WORLD_SIZE", "GROUP_", "ROLE_", "MASTER_", "TORCHELASTIC_",
                    "PET_", "OMP_NUM_THREADS", "TORCH_DISABLE_SHARE", "CUDA_VISIBLE_DEVICES",
                    "DISTRAIN_", "RAY_ADDRESS")


@pytest.fixture(autouse=True, scope="session")
def no_outer_slurm() -> Iterator[None]:
    """The suite may itself run in a SLURM job (CI on a cluster): its SLURM_* variables would make
    every in-process ``parse_launch_args`` and every child ``distrain launch`` take SLURM's
    defaults. The SLURM tests give their jobs the variables of their own test cluster."""
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("SLURM_")]:
            patch.delenv(key)
        yield


def _watched_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(WATCHED_PREFIXES)}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    env_before = _watched_env()
    threads_before = {t.ident for t in threading.enumerate()}
    yield
    env_after = _watched_env()
    changed = {k for k in env_before.keys() | env_after.keys() if env_before.get(k) != env_after.get(k)}
    assert not changed, f"test changed environment variables: {sorted(changed)}"
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized()), "test left a process group"
    deadline = time.monotonic() + 10
    children = [c for c in psutil.Process().children(recursive=True) if not _is_mp_helper(c)]
    while children and time.monotonic() < deadline:
        _, children = psutil.wait_procs(children, timeout=0.5)
    assert not children, f"test left child processes: {[c.pid for c in children]}"
    leaked = [t for t in threading.enumerate()
              if t.ident not in threads_before and t.is_alive() and not t.daemon]
    assert not leaked, f"test left threads running: {leaked}"


def _is_mp_helper(proc: psutil.Process) -> bool:
    """multiprocessing's resource tracker and forkserver live as long as the test process, by design."""
    try:
        command = " ".join(proc.cmdline())
        return "resource_tracker" in command or "forkserver" in command
    except psutil.Error:
        return False


# `make test` runs the suite on pytest-xdist workers, a whole group on one worker: a module (its
# module-scoped fixtures, an S3 server, hosts, a SLURM cluster, are built once), the modules that
# start a Ray cluster on this machine's loopback (one after another), the two that start SLURM
# daemons (fine alone, never tried side by side). Ray on separate hosts has its own namespaces.
# xdist's `--dist loadgroup` cannot group here: pytest 9 no longer reads the group suffix xdist
# writes into node ids, so every test went anywhere. The scheduler below groups by node id.
_SHARED_GROUPS = {"ray": ("test_ray_",), "slurm": ("test_slurm.py", "test_slurm_hosts.py")}
_OWN_NAMESPACES = ("test_ray_nodes.py",)
# The longest groups first (CI's durations): a long group that starts last sets the suite's end.
_LONGEST_FIRST = ("ray", "test_launch_local.py", "slurm", "test_fault_trials.py", "test_ray_nodes.py",
                  "test_nodes_elastic.py", "test_sharded_resume.py", "test_ckpt_s3_faults.py",
                  "test_hangs.py", "test_snapshots.py", "test_nodes_snapshots.py", "test_teardown.py",
                  "test_nodes_digits.py")


def group_of(nodeid: str) -> str:
    """The scheduling group of a test: its module's path, or a group shared by several modules."""
    path = nodeid.split("::", 1)[0]
    module = path.rsplit("/", 1)[-1]
    if module in _OWN_NAMESPACES:
        return path
    for group, prefixes in _SHARED_GROUPS.items():
        if module.startswith(prefixes):
            return group
    return path


def _start_rank(group: str) -> int:
    name = group.rsplit("/", 1)[-1]
    return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)


@pytest.hookimpl(trylast=True)  # the final order: pytest's own reordering has run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: _start_rank(group_of(item.nodeid)))  # stable: modules stay whole


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own scheduler choice
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # keep the longest-first order above
    return GroupScheduling(config, log)
