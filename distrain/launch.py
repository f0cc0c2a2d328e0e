"""Launch a distributed job: ``LaunchConfig`` -> ``launch(config)`` -> ``RunResult``.

The shape follows torchrun: the CLI (:mod:`distrain.launch_cli`) parses and validates flags once
into a typed :class:`LaunchConfig`, and :func:`launch` hands that to one launcher
(``distrain/launchers/``) which returns a :class:`RunResult` keyed by rank. Python callers can skip the CLI::

    from distrain.launch import run
    outputs = run(train_fn, lr, nproc=2)             # {0: ..., 1: ...}
    outputs = run(train_fn, lr, nproc=4, launcher="ray")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distrain.errors import ConfigError, LaunchFailedError
from distrain.launch_config import (
    DEFAULT_HANG_TIMEOUT,
    LAUNCHERS,
    LaunchConfig,
    RayOptions,
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
    "launch",
    "run",
]


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def launch(config: LaunchConfig) -> RunResult:
    """Start the workers described by ``config`` and wait for them.

    No worker process outlives the call, whatever happens (failure, signal, hang).

    Args:
        config: What to run and where (:class:`LaunchConfig`).

    Returns:
        The :class:`RunResult`: return values or exit codes by rank, the failed ranks and why,
        or the signal that stopped the launch.
    """
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
    """Run ``fn(*args)`` on ``nproc`` ranks and return their return values.

    Args:
        fn: A picklable function (defined at module level).
        *args: Its arguments (picklable).
        nproc: How many ranks.
        launcher: ``"local"`` or ``"ray"``.
        **options: Any other :class:`LaunchConfig` field (``max_restarts=1``, ``log_dir=...``).

    Returns:
        ``{rank: return value}``.

    Raises:
        ConfigError: An unknown launcher or ``nproc`` below 1.
        LaunchFailedError: A rank failed; the message is the failure summary.
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
