"""CPU workers pinned to cores of their own (``distrain launch --cpu-affinity auto``, the default).

A worker that trains on the CPU is pinned to its device the way a GPU worker is: the launcher
names the node's CPUs (its own affinity mask, so ``taskset`` and SLURM's cgroups are honoured)
in :data:`AFFINITY_ENV`, and each local rank takes a disjoint, contiguous share of whole cores
(hyperthread siblings stay together) in :func:`distrain.ddp.init`, before the process group
starts its threads; distrain's own background threads (async checkpoint writes, snapshot
copies, buddy sends) may still use every core of the node, at low priority. Left to the
scheduler, ranks migrate between cores and now and then share
one; pinned, they keep their caches and step at a steadier pace (docs/performance.md).

Nothing is pinned with fewer CPUs than local ranks, with one rank per node, on a GPU, outside
Linux, or under a launcher that does not set :data:`AFFINITY_ENV` (torchrun, Ray).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

AFFINITY_ENV = "DISTRAIN_CPU_AFFINITY"
_CPU_SYSFS = Path("/sys/devices/system/cpu")


def format_cpus(cpus: Collection[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"`` (the kernel's cpulist format)."""
    spans: list[list[int]] = []
    for cpu in sorted(cpus):
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in spans)


def parse_cpus(text: str) -> frozenset[int]:
    """The kernel's cpulist format (``"0-2,5"``) -> ``{0, 1, 2, 5}``; ValueError when malformed."""
    cpus: set[int] = set()
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def physical_cores(cpus: Collection[int], sysfs: Path = _CPU_SYSFS) -> list[tuple[int, ...]]:
    """``cpus`` grouped by physical core (hyperthread siblings together), in CPU order. A CPU
    whose topology the kernel does not show is a core of its own."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for cpu in sorted(cpus):
        try:
            siblings = parse_cpus((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text())
        except (OSError, ValueError):
            siblings = frozenset({cpu})
        groups.setdefault(tuple(sorted(siblings)), []).append(cpu)
    return [tuple(members) for members in groups.values()]


def cores_for(local_rank: int, local_world_size: int, cpus: Collection[int],
              cores: list[tuple[int, ...]] | None = None) -> frozenset[int] | None:
    """The CPUs of ``local_rank``'s share of ``cpus``: whole physical cores when there are at
    least as many as local ranks, else single CPUs; the first ranks take one more when the
    count does not divide. None: nothing to pin (one rank, or fewer CPUs than ranks)."""
    if local_world_size < 2 or not 0 <= local_rank < local_world_size:
        return None
    units = cores if cores is not None else physical_cores(cpus)
    if len(units) < local_world_size:
        units = [(cpu,) for cpu in sorted(cpus)]
    if len(units) < local_world_size:
        return None
    share, extra = divmod(len(units), local_world_size)
    start = local_rank * share + min(local_rank, extra)
    mine = units[start:start + share + (1 if local_rank < extra else 0)]
    return frozenset(cpu for unit in mine for cpu in unit)


def _node_cpus(environ: Mapping[str, str] | None) -> frozenset[int] | None:
    """The node's CPUs the launcher named in :data:`AFFINITY_ENV`; None where nothing is pinned
    (not set, ``--cpu-affinity none``, not Linux, or malformed: not ours to fail a training run
    over, the launcher writes this value)."""
    text = (os.environ if environ is None else environ).get(AFFINITY_ENV, "")
    if not text or not sys.platform.startswith("linux"):
        return None
    try:
        return parse_cpus(text)
    except ValueError:
        return None


def pin_worker(local_rank: int, local_world_size: int,
               environ: Mapping[str, str] | None = None) -> frozenset[int] | None:
    """Pin every thread of this process to ``local_rank``'s share of the node's CPUs named in
    :data:`AFFINITY_ENV` (threads started later inherit it). Returns the CPUs, or None when
    nothing was pinned. Idempotent: the share is computed from the launcher's list, not from
    this process's current mask."""
    node_cpus = _node_cpus(environ)
    mine = None if node_cpus is None else cores_for(local_rank, local_world_size, node_cpus)
    if mine is None:
        return None
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that just ended, or a CPU taken offline
            os.sched_setaffinity(int(task), mine)
    return mine


def unpin_this_thread(environ: Mapping[str, str] | None = None) -> None:
    """Let the calling thread run on any of the node's CPUs again (those in :data:`AFFINITY_ENV`):
    for distrain's own background threads (checkpoint writes, snapshot copies, buddy sends),
    which run at low priority in the gaps training leaves on every core, not only on their
    rank's. A no-op where :func:`pin_worker` pinned nothing."""
    node_cpus = _node_cpus(environ)
    if node_cpus is not None:
        with contextlib.suppress(OSError):  # a CPU taken offline
            os.sched_setaffinity(0, node_cpus)


def launcher_cpus() -> str:
    """The CPUs this launcher may use, in :func:`format_cpus` form (``""`` where the platform
    does not tell): what the workers of this node share out."""
    getter = getattr(os, "sched_getaffinity", None)
    if getter is None:
        return ""
    return format_cpus(getter(0))
