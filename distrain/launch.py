"""Launch a distributed job: ``LaunchConfig`` -> ``launch(config)`` -> ``RunResult``.

The shape follows torchrun: the CLI parses flags (``distrain/launch_args.py``),
:func:`config_from_args` validates them once into a typed :class:`LaunchConfig`, and
:func:`launch` hands that to one launcher (``distrain/launchers/``) which returns a
:class:`RunResult` keyed by rank. Python callers can skip the CLI::

    from distrain.launch import run
    outputs = run(train_fn, lr, nproc=2)             # {0: ..., 1: ...}
    outputs = run(train_fn, lr, nproc=4, launcher="ray")
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distrain.errors import ConfigError, LaunchFailedError
from distrain.launch_values import (
    _cuda_count,
    check_entrypoint,
    parse_endpoint,
    parse_hang_timeout,
    parse_nnodes,
    parse_nproc_per_node,
    parse_num_workers,
    parse_port,
    parse_ranks_filter,
    parse_rdzv_conf,
    parse_std,
)

LAUNCHERS = ("local", "ray")
RDZV_BACKENDS = ("static", "c10d")
START_METHODS = ("spawn", "fork", "forkserver")
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
    """Everything a launcher needs, validated. Build it with :func:`config_from_args` or directly.

    ``entrypoint`` is a script path, a module name (``module=True``), an executable
    (``no_python=True``) or a picklable callable (Python API).
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


@dataclass(frozen=True, slots=True, kw_only=True)
class RankFailure:
    """Why one rank failed."""

    rank: int
    local_rank: int
    exitcode: int
    signal: str | None
    node: str
    log_tail: str
    teardown_abort: bool = False
    collective_timeout: bool = False  # its output shows a gloo/NCCL collective timeout
    peer_lost: bool = False  # its output shows a peer's connection going away
    lost_peer: str | None = None  # the host it lost, when the output names it: "host1 (10.0.0.2)"
    raised: bool = False  # it recorded an uncaught exception of its own (then may have been stopped)

    def describe(self) -> str:
        how = f"killed by {self.signal}" if self.signal else f"exit code {self.exitcode}"
        if self.raised and self.signal:
            how = f"raised an exception (then stopped by {self.signal} while exiting)"
        head = f"rank {self.rank} (local rank {self.local_rank} on {self.node}) failed: {how}"
        if self.teardown_abort:
            head += (
                "\n  This is the gloo teardown abort: the script finished, then the process "
                "aborted at interpreter exit because a DDP/FSDP wrapper outlived the process "
                "group. Fix: call distrain.ddp.cleanup() at the end of the script (or `del model`"
                " before dist.destroy_process_group()); see README 'Troubleshooting'."
            )
        if self.collective_timeout:
            head += (
                "\n  Its collective timed out: another rank did not join the same collective "
                "within the process group timeout (stuck, far slower, or dead). Look for the rank "
                "that was not in it; raise ddp.init(timeout=...) only if ranks are legitimately "
                "that slow (e.g. rank 0 writing a large checkpoint); see README 'Troubleshooting'."
            )
        elif self.peer_lost and self.lost_peer:
            head += (f"\n  It lost its connection to a peer on {self.lost_peer}: that host, or a "
                     "rank on it, went away first (killed, crashed or unreachable).")
        elif self.peer_lost:
            head += ("\n  It lost its connection to a peer: usually a consequence of another "
                     "rank failing (listed first when distrain saw it fail).")
        return self.with_output(head)

    def with_output(self, head: str) -> str:
        """``head`` followed by the last lines of the rank's output, indented."""
        if not self.log_tail:
            return head
        tail = "\n".join("    " + line for line in self.log_tail.rstrip().splitlines())
        return f"{head}\n  last lines of its output:\n{tail}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """The outcome of a launch: return values (functions) or exit codes, keyed by global rank."""

    return_values: Mapping[int, Any]
    failures: tuple[RankFailure, ...] = ()
    signal: str | None = None
    restarts: int = 0
    log_dir: str | None = None
    diagnosis: str = ""  # what the hang watch found (stuck rank first), when it stopped the run

    @property
    def ok(self) -> bool:
        return not self.failures and self.signal is None

    def summary(self) -> str:
        if self.signal:
            return f"distrain: stopped by {self.signal}; workers were asked to stop first."
        if not self.failures:
            return f"distrain: all {len(self.return_values)} local ranks finished successfully."
        lost = {f.lost_peer for f in self.failures if f.peer_lost and f.lost_peer}
        also = f"; lost contact with {', '.join(sorted(lost))}" if lost else ""
        lines = [self.diagnosis] if self.diagnosis else []
        lines += [f"distrain: the job failed ({len(self.failures)} rank(s){also}):"]
        lines += [f.describe() for f in self.failures]
        return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    """Validate parsed CLI flags into a :class:`LaunchConfig`. Raises :class:`ConfigError`."""
    if args.launcher not in LAUNCHERS:
        raise ConfigError("--launcher", args.launcher, " or ".join(LAUNCHERS), "use --launcher local")
    min_nodes, max_nodes = parse_nnodes(str(args.nnodes))
    nproc = parse_nproc_per_node(
        str(args.nproc_per_node),
        # Only auto/gpu need CUDA: importing torch costs seconds the Ray launcher never needs.
        cuda_count=_cuda_count() if str(args.nproc_per_node) in ("auto", "gpu") else 0,
        cpu_count=os.cpu_count() or 1,
    )
    if args.rdzv_backend not in RDZV_BACKENDS:
        raise ConfigError(
            "--rdzv-backend", args.rdzv_backend, "static or c10d", "use --rdzv-backend c10d"
        )
    if args.start_method not in START_METHODS:
        raise ConfigError(
            "--start-method", args.start_method, "|".join(START_METHODS), "use --start-method spawn"
        )
    if not 0 <= args.node_rank < max_nodes:
        raise ConfigError(
            "--node-rank", args.node_rank, f"0 .. {max_nodes - 1} (--nnodes {args.nnodes})",
            "give each node a distinct rank below --nnodes",
        )
    if args.max_restarts < 0:
        raise ConfigError("--max-restarts", args.max_restarts, ">= 0", "use 0 to never restart")
    if args.monitor_interval <= 0:
        raise ConfigError("--monitor-interval", args.monitor_interval, "> 0 seconds", "e.g. 0.1")
    if args.term_timeout < 0:
        raise ConfigError("--term-timeout", args.term_timeout, ">= 0 seconds", "e.g. 30")
    if not args.master_addr:
        raise ConfigError("--master-addr", args.master_addr, "a host name or IP", "e.g. 127.0.0.1")
    master_port = parse_port(args.master_port, "--master-port")
    endpoint = args.rdzv_endpoint or ""
    if endpoint:
        parse_endpoint(endpoint)
    if args.standalone and max_nodes > 1:
        raise ConfigError(
            "--standalone", "set", "a single node (--nnodes 1)", "drop --standalone for multi-node"
        )
    # Rendezvous flags are the local launcher's; the Ray launcher places ranks itself and
    # is elastic between --nnodes MIN:MAX without a rendezvous backend.
    local = args.launcher != "ray"
    if local and max_nodes > 1 and args.rdzv_backend == "static" and not endpoint \
            and master_port is None:
        raise ConfigError(
            "--master-port", None, "a port every node agrees on when --nnodes > 1",
            "pass the same --master-port (and --master-addr of node 0) to every node",
        )
    if local and max_nodes > 1 and args.rdzv_backend == "c10d" and not endpoint:
        raise ConfigError(
            "--rdzv-endpoint", "", "HOST:PORT that every node can reach with c10d",
            "pass --rdzv-endpoint NODE0_HOST:PORT to every node",
        )
    if local and args.rdzv_backend == "static" and min_nodes != max_nodes:
        raise ConfigError(
            "--nnodes", args.nnodes, "a fixed N with static rendezvous",
            "use --rdzv-backend c10d for elastic MIN:MAX",
        )
    if args.log_dir and Path(args.log_dir).exists() and not Path(args.log_dir).is_dir():
        raise ConfigError("--log-dir", args.log_dir, "a directory", "pick a directory path")
    if args.launcher == "ray" and args.ray_address == "":
        raise ConfigError("--address", "", "auto, HOST:PORT or ray://HOST:PORT", "or omit it")
    if args.placement_strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError(
            "--placement-strategy", args.placement_strategy, "|".join(PLACEMENT_STRATEGIES),
            "use PACK (default) or SPREAD",
        )
    workers = parse_num_workers(args.num_workers, args.launcher)
    for flag, value in (("--cpus-per-worker", args.cpus_per_worker),
                        ("--gpus-per-worker", args.gpus_per_worker)):
        if value < 0:
            raise ConfigError(flag, value, ">= 0", f"fix {flag}")
    script = check_entrypoint(args.training_script, module=args.module, no_python=args.no_python)
    if workers is not None:  # Ray's spelling: N workers in all, or MIN:MAX one by one
        low, high = workers
        min_nodes, max_nodes, nproc = (1, 1, low) if low == high else (low, high, 1)
    return LaunchConfig(
        entrypoint=script,
        args=tuple(args.training_script_args),
        module=args.module,
        no_python=args.no_python,
        launcher=args.launcher,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=master_port,
        rdzv_backend=args.rdzv_backend,
        rdzv_endpoint=endpoint,
        rdzv_id=args.rdzv_id,
        rdzv_conf=parse_rdzv_conf(args.rdzv_conf),
        standalone=args.standalone,
        max_restarts=args.max_restarts,
        monitor_interval=args.monitor_interval,
        start_method=args.start_method,
        preload=tuple(name.strip() for name in args.preload.split(",") if name.strip()),
        role=args.role,
        log_dir=args.log_dir,
        redirects=parse_std(args.redirects, "--redirects", nproc),
        tee=parse_std(args.tee, "--tee", nproc),
        local_ranks_filter=parse_ranks_filter(args.local_ranks_filter, nproc),
        local_addr=args.local_addr,
        term_timeout=args.term_timeout,
        hang_timeout=parse_hang_timeout(args.hang_timeout),
        ray=RayOptions(
            address=args.ray_address,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker,
            placement_strategy=args.placement_strategy,
            working_dir=args.working_dir,
            pip=tuple(args.pip),
        ),
    )


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def launch(config: LaunchConfig) -> RunResult:
    """Start the workers described by ``config`` and wait for them."""
    if config.launcher == "ray":
        from distrain.launchers.ray import RayLauncher

        return RayLauncher().launch(config)
    from distrain.launchers.local import LocalLauncher

    return LocalLauncher().launch(config)


def run(
    fn: Callable[..., Any],
    *args: Any,
    nproc: int = 2,
    launcher: str = "local",
    **options: Any,
) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``nproc`` ranks and return ``{rank: return value}``.

    ``fn`` must be picklable (defined at module level). ``options`` are any other
    :class:`LaunchConfig` fields (``max_restarts=1``, ``log_dir=...``). Raises
    :class:`~distrain.errors.LaunchFailedError` with the failure summary if a rank fails.
    """
    if launcher not in LAUNCHERS:
        raise ConfigError("launcher", launcher, " or ".join(LAUNCHERS), 'use launcher="local"')
    if nproc < 1:
        raise ConfigError("nproc", nproc, "at least 1", "e.g. nproc=2")
    config = LaunchConfig(
        entrypoint=fn, args=args, nproc_per_node=nproc, launcher=launcher, **options
    )
    result = launch(config)
    if not result.ok:
        raise LaunchFailedError(result.summary())
    return dict(result.return_values)
