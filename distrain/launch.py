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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distrain.errors import ConfigError, LaunchFailedError
from distrain.launch_config import (
    DEFAULT_HANG_TIMEOUT,
    LAUNCHERS,
    PLACEMENT_STRATEGIES,
    RDZV_BACKENDS,
    START_METHODS,
    LaunchConfig,
    RayOptions,
)
from distrain.launch_values import (
    check_entrypoint,
    cuda_count,
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
from distrain.results import RankFailure, RunResult

# The types live in leaf modules (the launchers import them from there); named here too, so
# ``from distrain.launch import LaunchConfig, RunResult`` keeps working.
__all__ = [
    "DEFAULT_HANG_TIMEOUT",
    "LaunchConfig",
    "RankFailure",
    "RayOptions",
    "RunResult",
    "config_from_args",
    "launch",
    "run",
]


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    """Validate parsed CLI flags into a :class:`LaunchConfig`. Raises :class:`ConfigError`."""
    if args.launcher not in LAUNCHERS:
        raise ConfigError("--launcher", args.launcher, " or ".join(LAUNCHERS), "use --launcher local")
    min_nodes, max_nodes = parse_nnodes(str(args.nnodes))
    nproc = parse_nproc_per_node(
        str(args.nproc_per_node),
        # Only auto/gpu need CUDA: importing torch costs seconds the Ray launcher never needs.
        cuda_count=cuda_count() if str(args.nproc_per_node) in ("auto", "gpu") else 0,
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
