"""``LaunchConfig``: everything a launcher needs, validated (built by the CLI or by Python callers).

A leaf module: the launchers name the type without importing :mod:`distrain.launch` back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_HANG_TIMEOUT", "LAUNCHERS", "LaunchConfig", "RayOptions"]

LAUNCHERS = ("local", "ray")
RDZV_BACKENDS = ("static", "c10d")
START_METHODS = ("spawn", "fork", "forkserver")
CPU_AFFINITY_MODES = ("auto", "none")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
DEFAULT_HANG_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RayOptions:
    """Options only the Ray launcher reads."""

    address: str | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    placement_strategy: str = "PACK"
    working_dir: str | None = None
    pip: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchConfig:
    """Everything a launcher needs, validated.

    The CLI builds it with :func:`distrain.launch_cli.config_from_args`; Python callers build it
    directly (or call :func:`distrain.launch.run`). The fields are torchrun's flags, underscored.

    Attributes:
        entrypoint: A script path, a module name (``module=True``), an executable
            (``no_python=True``) or a picklable callable (Python API).
        args: The script's arguments, or the callable's.
        launcher: ``"local"`` (torch elastic's agent) or ``"ray"``.
        min_nodes: Fewest nodes (elastic with c10d rendezvous).
        max_nodes: Most nodes; ``world_size`` is ``max_nodes * nproc_per_node``.
        nproc_per_node: Workers per node.
        cpu_affinity: ``"auto"``: each CPU worker of a node is pinned to a disjoint share of
            the launcher's CPUs (:mod:`distrain.affinity`); ``"none"``: the scheduler places them.
        max_restarts: How often the whole group is restarted after a failure.
        hang_timeout: Seconds without progress on any rank before the hang watch stops the
            group; 0 turns it off.
        ray: Options only the Ray launcher reads.
    """

    entrypoint: str | Callable[..., Any]
    args: tuple[Any, ...] = ()
    module: bool = False
    no_python: bool = False
    launcher: str = "local"
    min_nodes: int = 1
    max_nodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    rdzv_backend: str = "static"
    rdzv_endpoint: str = ""
    rdzv_id: str = "none"
    rdzv_conf: Mapping[str, str] = field(default_factory=dict)
    standalone: bool = False
    max_restarts: int = 0
    monitor_interval: float = 0.1
    start_method: str = "forkserver"
    cpu_affinity: str = "auto"
    preload: tuple[str, ...] = ("auto",)
    role: str = "default"
    log_dir: str | None = None
    redirects: str = "0"
    tee: str = "0"
    local_ranks_filter: frozenset[int] | None = None
    local_addr: str | None = None
    term_timeout: float = 30.0
    hang_timeout: float = DEFAULT_HANG_TIMEOUT  # seconds without progress; 0: off
    ray: RayOptions = field(default_factory=RayOptions)

    @property
    def world_size(self) -> int:
        return self.max_nodes * self.nproc_per_node
