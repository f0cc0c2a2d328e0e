"""Connecting the Ray launcher to a cluster, and what it ships there.

* :func:`find_target` and :func:`ray_session` join ``--address`` (or ``RAY_ADDRESS``, or a Ray
  already running on this machine, or the caller's own ``ray.init``) or, with none of those,
  start a local Ray with the dashboard off, bound to the loopback, sized so the job fits; the
  session disconnects (and stops what it started) on exit.
* :func:`plan_command` decides how each rank's process is started and what reaches the nodes
  through Ray's ``runtime_env``: on a cluster the script's directory (``working_dir``),
  distrain itself (``py_modules``), selected environment variables (``env_vars``) and
  ``--pip`` packages, so the nodes need no shared filesystem for code.
* :func:`capacity` counts how many workers the alive nodes can hold (elastic restarts).
* :func:`catch_signals` turns SIGTERM/SIGINT/SIGHUP/SIGQUIT into a flag the launcher polls.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distrain.env import scoped_environ
from distrain.errors import ConfigError
from distrain.signals import HANDLED_SIGNALS, installed

if TYPE_CHECKING:
    from distrain.launch_config import LaunchConfig, RayOptions

# The distrain package directory, shipped to Ray workers (this file is distrain/launchers/...).
PACKAGE_DIR = Path(__file__).resolve().parents[1]
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Driver variables that matter to a training script and are safe to carry to another machine.
FORWARDED_PREFIXES = (
    "DISTRAIN_", "TORCH_", "PYTORCH_", "NCCL_", "GLOO_", "CUBLAS_", "CUDNN_", "MKL_", "KMP_",
    "HF_", "WANDB_",
)
FORWARDED_NAMES = ("PYTHONHASHSEED", "CUDA_LAUNCH_BLOCKING", "LOGLEVEL")
SHIP_EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandPlan:
    """How every rank's process starts (the same for all ranks; the env differs per rank)."""

    argv: tuple[str, ...]
    python: bool
    inherit_env: bool
    cwd: str | None
    runtime_env: Mapping[str, Any] = field(default_factory=dict)
    # The launcher's environment as it was before ray.init wrote to it (PYTHONBREAKPOINT, ...):
    # the ranks' base when they do not inherit their node's.
    base_env: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class StopRequest:
    """The signals received while the launcher runs (set by the handlers, read by the loop)."""

    name: str | None = None
    count: int = 0


@contextlib.contextmanager
def catch_signals() -> Iterator[StopRequest]:
    """Record SIGTERM/SIGINT/SIGHUP/SIGQUIT instead of dying, so workers can be stopped first.

    Only the main thread may install handlers; elsewhere signals keep their usual effect.
    """
    request = StopRequest()

    def handler(signum: int, frame: object) -> None:
        request.count += 1
        request.name = request.name or signal.Signals(signum).name

    with installed(HANDLED_SIGNALS, handler, unknown=signal.SIG_DFL):
        yield request


def _ray_address_file() -> Path:
    """Where ``ray start`` records the cluster it started (Ray's own rule, without importing
    Ray: importing it fixes which address a local Ray would bind)."""
    root = os.environ.get("RAY_TMPDIR")
    if root is None and sys.platform.startswith("linux"):
        root = os.environ.get("TMPDIR")
    return Path(root or "/tmp") / "ray" / "ray_current_cluster"


def _running_cluster_address() -> str | None:
    """The address of a Ray already started on this machine (``ray start``), if it answers.

    Ray remembers the last cluster in a file that outlives it; a dead one is ignored rather
    than joined (joining it fails with a misleading error).
    """
    try:
        address = _ray_address_file().read_text().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return address
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Which Ray to use: ``joined`` (the caller's ``ray.init``), ``address``, or neither
    (``embedded``: a local Ray this launcher starts)."""

    address: str | None
    joined: bool

    @property
    def embedded(self) -> bool:
        return self.address is None and not self.joined


def find_target(options: RayOptions) -> Target:
    """``--address``, else ``RAY_ADDRESS``, else a live ``ray start`` on this machine, else none."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return Target(address=None, joined=True)
    address = options.address or os.environ.get("RAY_ADDRESS") or _running_cluster_address()
    return Target(address=address, joined=False)


def _is_loopback(address: str | None) -> bool:
    if not address or address.startswith("ray://") or address == "auto":
        return False
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def ray_session(target: Target, *, runtime_env: Mapping[str, Any], num_cpus: float,
                say: Any) -> Iterator[None]:
    """Connect to (or start) Ray for one launch; disconnect and stop what we started after.

    ``runtime_env`` is the job's: local directories (``working_dir``, ``py_modules``) can only
    be uploaded at this level. A caller's own ``ray.init`` is used as it is. ``os.environ`` is
    restored on exit.
    """
    # Read when Ray is imported: a local Ray then binds 127.0.0.1 and a loopback address is
    # dialled as it is. Without it Ray turns 127.0.0.1 into the machine's outward address and a
    # driver for a loopback cluster waits forever for a GCS that is not there.
    loopback = target.embedded or _is_loopback(target.address)
    changes = {LOOPBACK_ENV: os.environ.get(LOOPBACK_ENV, "0")} if loopback else {}
    with scoped_environ(changes):  # ray.init also writes to os.environ (PYTHONBREAKPOINT, ...)
        import ray

        env = dict(runtime_env) or None
        try:
            if target.embedded:
                cpus = max(os.cpu_count() or 1, math.ceil(num_cpus))
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, runtime_env=env)
                say(f"distrain: started a local Ray ({cpus} CPUs, dashboard off)")
            elif not target.joined:
                try:
                    ray.init(address=target.address, log_to_driver=False,
                             logging_level=logging.WARNING, runtime_env=env)
                except Exception as error:  # Ray's message spans a traceback; say it in one line
                    raise ConfigError("--address", target.address, "a Ray cluster this machine can join",
                                      connect_fix(error)) from None
                say(f"distrain: connected to the Ray cluster at {target.address}")
            yield
        finally:
            if not target.joined and ray.is_initialized():
                ray.shutdown()


def connect_fix(error: BaseException) -> str:
    """What to do when ``ray.init(address=...)`` failed, judged from the whole exception chain."""
    chain: list[str] = []
    cause: BaseException | None = error
    while cause is not None and len(chain) < 10:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = " ".join(chain)
    if any(word in text for word in ("InvalidAuthToken", "authorization", "Authentication")):
        return ("the cluster uses token authentication (`ray start` turns it on): export "
                "RAY_AUTH_MODE=token and provide its token (~/.ray/auth_token, RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH)")
    return ("check that the head is up (`ray status --address ADDR`) and pass its GCS address "
            "(HOST:6379), or drop --address to start a local Ray")


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items()
            if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES}


def plan_command(config: LaunchConfig, target: Target) -> CommandPlan:
    """The command line, environment base, directory and job ``runtime_env`` for every rank.

    On a local Ray this launcher starts, ranks run as the local launcher's do: the driver's
    environment and directory, the script by its path. On a cluster (or with
    ``--working-dir``) the code travels through ``runtime_env`` and each rank inherits its
    node's environment. With the caller's own ``ray.init`` nothing is shipped (its
    ``runtime_env`` is the caller's to set) and scripts are found by their path.
    """
    options = config.ray
    ship = not target.joined and (not target.embedded or options.working_dir is not None)
    runtime_env: dict[str, Any] = {}
    if options.pip:
        runtime_env["pip"] = list(options.pip)
    if callable(config.entrypoint):
        argv: tuple[str, ...] = ("-m", "distrain.launchers.ray_fn")
        python = True
        script = None
    elif config.no_python:
        argv, python, script = (str(config.entrypoint), *map(str, config.args)), False, None
    elif config.module:
        argv, python, script = ("-m", str(config.entrypoint), *map(str, config.args)), True, None
    else:
        script = Path(str(config.entrypoint)).resolve()
        argv, python = (str(script), *map(str, config.args)), True
    if not ship:
        inherit = not target.embedded or bool(options.pip)
        return CommandPlan(argv=argv, python=python, inherit_env=inherit, cwd=os.getcwd(),
                           runtime_env={} if target.joined else runtime_env,
                           base_env={} if inherit else dict(os.environ))
    working_dir = options.working_dir
    if working_dir is None and script is not None:
        working_dir = str(script.parent)
    cwd: str | None = os.getcwd()
    if working_dir is not None:
        root = Path(working_dir).resolve()
        if not root.is_dir():
            raise ConfigError("--working-dir", working_dir, "an existing directory",
                              "name the directory that holds the training code")
        runtime_env["working_dir"] = str(root)
        cwd = None  # Ray starts the actor in its copy of working_dir; the rank stays there
        if script is not None:
            if not script.is_relative_to(root):
                raise ConfigError("script", str(config.entrypoint), f"a file inside {root}",
                                  "pass --working-dir as a directory that contains the script")
            argv = (str(script.relative_to(root)), *argv[1:])
    runtime_env["py_modules"] = [str(PACKAGE_DIR)]
    runtime_env["excludes"] = list(SHIP_EXCLUDES)
    env_vars = forwarded_env(os.environ)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return CommandPlan(argv=argv, python=python, inherit_env=True, cwd=cwd,
                       runtime_env=runtime_env)


def bundle(options: RayOptions) -> dict[str, float]:
    """One rank's reservation: ``{"CPU": c, "GPU": g}`` without zero entries."""
    resources = {"CPU": options.cpus_per_worker, "GPU": options.gpus_per_worker}
    return {k: v for k, v in resources.items() if v > 0}


def capacity(nodes: Sequence[Mapping[str, Any]], options: RayOptions) -> int:
    """How many one-rank bundles the alive ``nodes`` (``ray.nodes()``) can hold in total."""
    need = bundle(options)
    per_node = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fits = min(math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need.items())
        per_node.append(max(0, fits))
    if not per_node:
        return 0
    if options.placement_strategy == "STRICT_SPREAD":
        return sum(1 for n in per_node if n > 0)
    if options.placement_strategy == "STRICT_PACK":
        return max(per_node)
    return sum(per_node)


def choose_size(config: LaunchConfig, available: int) -> int:
    """The world size for the next attempt: the most workers that fit, in steps of
    ``nproc_per_node``, between ``min_nodes`` and ``max_nodes`` of them (at least the minimum:
    a cluster that autoscales grows when Ray sees the pending reservation)."""
    units = available // config.nproc_per_node
    return max(config.min_nodes, min(config.max_nodes, units)) * config.nproc_per_node
