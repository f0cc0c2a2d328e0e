"""The ``distrain launch`` command line: flags -> :func:`config_from_args` -> ``LaunchConfig``.

The shape is torchrun's: :func:`build_launch_parser` has torchrun's flags and spellings (plus
``PET_*`` environment defaults and, inside a SLURM job, the job's layout), one ``parse_*``
function per flag validates what the user typed into a typed value or raises
:class:`~distrain.errors.ConfigError`, and :func:`config_from_args` calls them once to build the
:class:`~distrain.launch_config.LaunchConfig` that :func:`distrain.launch.launch` runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from distrain.errors import ConfigError, OneLineParser
from distrain.launch_config import (
    CPU_AFFINITY_MODES,
    LAUNCHERS,
    PLACEMENT_STRATEGIES,
    RDZV_BACKENDS,
    START_METHODS,
    LaunchConfig,
    RayOptions,
)
from distrain.std_spec import std_values

# -- the parser --------------------------------------------------------------------------------

DEFAULT_START_METHOD = "forkserver"



def _flag(name: str) -> list[str]:
    dashed = "--" + name.replace("_", "-")
    under = "--" + name
    return [dashed] if dashed == under else [dashed, under]


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the grouped ``distrain launch`` options to ``parser``."""
    size = parser.add_argument_group("workers and nodes")
    size.add_argument(*_flag("nnodes"), default="1", help="N or MIN:MAX nodes (default 1)")
    size.add_argument(*_flag("nproc_per_node"), default="1",
                      help="workers per node: an integer, auto, cpu or gpu (default 1)")
    size.add_argument(*_flag("node_rank"), type=int, default=0,
                      help="this node's rank for static rendezvous (default 0)")
    size.add_argument("--launcher", default="local", help="local (default) or ray")
    size.add_argument(*_flag("cpu_affinity"), default="auto",
                      help="auto (default): pin each CPU worker to its own share of this node's "
                           "cores (local launcher; GPU workers are not pinned); none: leave "
                           "placement to the OS scheduler, as torchrun does")

    rdzv = parser.add_argument_group("rendezvous")
    rdzv.add_argument(*_flag("master_addr"), default="127.0.0.1",
                      help="node 0's address for static rendezvous (default 127.0.0.1)")
    rdzv.add_argument(*_flag("master_port"), default=None,
                      help="node 0's port; default: a free port (single node)")
    rdzv.add_argument(*_flag("rdzv_backend"), default="static", help="static (default) or c10d")
    rdzv.add_argument(*_flag("rdzv_endpoint"), default="", help="HOST:PORT of the c10d store")
    rdzv.add_argument(*_flag("rdzv_id"), default="none", help="job id shared by all nodes")
    rdzv.add_argument(*_flag("rdzv_conf"), default="", help="KEY=VALUE,... for the rendezvous")
    rdzv.add_argument("--standalone", action="store_true",
                      help="single node with a private c10d store on a free port")
    rdzv.add_argument(*_flag("local_addr"), default=None, help="this node's address")

    fault = parser.add_argument_group("failures and signals")
    fault.add_argument(*_flag("max_restarts"), type=int, default=0,
                       help="restart the whole group up to N times on failure (default 0)")
    fault.add_argument(*_flag("monitor_interval"), type=float, default=0.1,
                       help="seconds between worker health checks (default 0.1)")
    fault.add_argument(*_flag("term_timeout"), type=float, default=30.0,
                       help="grace period after SIGTERM before workers are killed (default 30)")
    fault.add_argument(*_flag("hang_timeout"), default="600",
                       help="seconds without progress on any rank before the launcher collects "
                            "every rank's stack, names the stuck one and stops (then restarts) "
                            "the group; 0 turns it off (default 600)")
    fault.add_argument(*_flag("start_method"), default=DEFAULT_START_METHOD,
                       help="forkserver: fork script workers from a process that already imported "
                            "torch (fast start); spawn: one fresh interpreter per worker, as torchrun;"
                            f" fork (function entrypoints). Default {DEFAULT_START_METHOD}")
    fault.add_argument("--preload", default="auto",
                       help="modules the fast-start server imports once for all workers: torch always, "
                            "plus these (comma-separated); 'script' adds the script's top-level "
                            "imports of installed packages; 'auto' (default) does so when the local "
                            "ranks outnumber the CPU cores; --preload torch for torch only")
    fault.add_argument("--role", default="default", help="worker role name (default 'default')")

    logs = parser.add_argument_group("logs")
    logs.add_argument(*_flag("log_dir"), default=None,
                      help="write one stdout/stderr file per rank and attempt under this directory")
    logs.add_argument("--redirects", default="0",
                      help="redirect worker streams to files: 0 none,1 out,2 err,3 both")
    logs.add_argument("--tee", default="0", help="also copy streams to the console: 0-3")
    logs.add_argument(*_flag("local_ranks_filter"), default="",
                      help="only show these local ranks on the console, e.g. 0")

    ray = parser.add_argument_group("ray launcher (--launcher ray)")
    ray.add_argument("--address", dest="ray_address", default=None,
                     help="auto, HOST:PORT or ray://HOST:PORT; default: a new local Ray")
    ray.add_argument(*_flag("num_workers"), default=None,
                     help="total workers N, or MIN:MAX to restart elastically "
                          "(instead of --nnodes x --nproc-per-node)")
    ray.add_argument(*_flag("cpus_per_worker"), type=float, default=1.0, help="default 1")
    ray.add_argument(*_flag("gpus_per_worker"), type=float, default=0.0, help="default 0")
    ray.add_argument(*_flag("placement_strategy"), default="PACK",
                     help="PACK (default), SPREAD, STRICT_PACK or STRICT_SPREAD")
    ray.add_argument(*_flag("working_dir"), default=None,
                     help="directory shipped to the workers (default: the script's directory)")
    ray.add_argument("--pip", action="append", default=[], help="pip package for the workers")

    what = parser.add_argument_group("what to run")
    what.add_argument("-m", "--module", action="store_true",
                      help="run the entrypoint as a module (python -m)")
    what.add_argument(*_flag("no_python"), action="store_true",
                      help="run the entrypoint as an executable, not through python")
    what.add_argument("training_script", nargs="?", default=None,
                      help="the training script (or module with -m)")
    what.add_argument("training_script_args", nargs=argparse.REMAINDER,
                      help="arguments for the script")


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """torchrun's ``PET_*`` rule: an option left off the command line comes from the env."""
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = environ.get("PET_" + action.dest.upper())
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.lower() in ("1", "true", "yes")
        elif action.type is not None and callable(action.type):
            try:
                action.default = action.type(value)
            except ValueError:
                parser.error(f"PET_{action.dest.upper()}={value!r} is not a valid {action.dest}")
        else:
            action.default = value


def parse_launch_args(argv: Sequence[str], *, environ: Mapping[str, str] | None = None,
                      prog: str = "distrain launch") -> argparse.Namespace:
    from distrain.launchers.slurm_env import apply_slurm_defaults

    parser = build_launch_parser(prog)
    environ = os.environ if environ is None else environ
    apply_env_defaults(parser, environ)
    apply_slurm_defaults(parser, argv, environ)  # inside a SLURM job; explicit flags win
    return parser.parse_args(list(argv))


# Launcher options that a training script hardly ever takes itself: after the script, they are
# almost surely meant for the launcher.
LAUNCHER_ONLY = ("nnodes", "nproc_per_node", "node_rank", "master_addr", "master_port", "rdzv_backend",
                 "rdzv_endpoint", "rdzv_id", "rdzv_conf", "standalone", "max_restarts", "start_method",
                 "cpu_affinity", "launcher", "monitor_interval", "term_timeout")


def misplaced_launcher_options(script_args: Sequence[str]) -> list[str]:
    """Launcher-only options found among the script's arguments (they went to the script)."""
    flags = {flag for name in LAUNCHER_ONLY for flag in _flag(name)}
    return [arg.split("=")[0] for arg in script_args if arg.split("=")[0] in flags]


def blame_environment(message: str, what: str, argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """Name ``PET_<NAME>`` in an error about ``--name`` when the value came from the environment."""
    if not what.startswith("--"):
        return message
    dest = what[2:].replace("-", "_")
    variable = "PET_" + dest.upper()
    typed = any(arg.split("=")[0] in _flag(dest) for arg in argv)
    if typed or variable not in environ:
        return message
    return f"{variable}={environ[variable]!r} (read as {what}): {message}"


def build_launch_parser(prog: str = "distrain launch") -> OneLineParser:
    parser = OneLineParser(
        prog=prog,
        allow_abbrev=False,
        description="Start distributed workers (torchrun-compatible).",
        epilog="Examples:\n  distrain launch --nproc-per-node 2 train.py --epochs 3\n"
               "  distrain launch --nnodes 2 --node-rank 0 --master-addr HOST "
               "--master-port 29500 --nproc-per-node 4 train.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_launch_arguments(parser)
    return parser


# -- one validator per flag --------------------------------------------------------------------

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+)(?::(?P<port>[^:]*))?$")


def parse_range(flag: str, text: str, fix: str) -> tuple[int, int]:
    """``"N"`` or ``"MIN:MAX"`` -> (min, max), both positive."""
    parts = text.split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(flag, text, "N or MIN:MAX with positive integers", fix)
    low, high = int(parts[0]), int(parts[-1])
    if low < 1 or high < low:
        raise ConfigError(flag, low if len(parts) == 1 else text, "1 <= MIN <= MAX", fix)
    return low, high


def parse_nnodes(text: str) -> tuple[int, int]:
    """``"N"`` or ``"MIN:MAX"`` -> (min, max)."""
    fix = "use --nnodes N or --nnodes MIN:MAX, e.g. --nnodes 2 or --nnodes 1:4"
    return parse_range("--nnodes", text, fix)


def parse_nproc_per_node(text: str, *, cuda_count: int, cpu_count: int) -> int:
    """torchrun's ``--nproc-per-node``: an integer, ``auto``, ``cpu`` or ``gpu``."""
    fix = "pass a positive integer, or auto|cpu|gpu"
    if text == "cpu":
        return cpu_count
    if text == "auto":
        return cuda_count if cuda_count > 0 else cpu_count
    if text == "gpu":
        if cuda_count == 0:
            raise ConfigError(
                "--nproc-per-node", text, "a machine with CUDA GPUs", "use cpu, auto or a number"
            )
        return cuda_count
    try:
        value = int(text)
    except ValueError:
        raise ConfigError("--nproc-per-node", text, "an integer or auto|cpu|gpu", fix) from None
    if value < 1:
        raise ConfigError("--nproc-per-node", text, "at least 1", fix)
    return value


def parse_port(text: str | int | None, flag: str) -> int | None:
    if text is None or text == "":
        return None
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise ConfigError(flag, text, "a port number 1-65535", f"fix {flag}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(flag, port, "a port number 1-65535", f"pick a port in 1-65535 for {flag}")
    return port


def parse_endpoint(text: str) -> tuple[str, int | None]:
    """``HOST[:PORT]`` -> (host, port or None); ``PORT`` 0 means "pick a free one"."""
    match = _HOST_PORT.match(text.strip())
    fix = "use HOST:PORT, e.g. --rdzv-endpoint 127.0.0.1:29400"
    if not match:
        raise ConfigError("--rdzv-endpoint", text, "HOST:PORT", fix)
    port_text = match.group("port")
    if port_text is None:
        return match.group("host"), None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError("--rdzv-endpoint", text, "HOST:PORT with a port 0-65535", fix)
    return match.group("host"), int(port_text)


def parse_hang_timeout(text: str | float) -> float:
    """``--hang-timeout SECONDS``: a finite number >= 0 (0 turns hang detection off)."""
    fix = "e.g. --hang-timeout 600, or --hang-timeout 0 to turn hang detection off"
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError("--hang-timeout", text, "a number of seconds >= 0", fix) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError("--hang-timeout", text, "a number of seconds >= 0", fix)
    return value


def parse_rdzv_conf(text: str) -> dict[str, str]:
    """``key1=v1,key2=v2`` -> dict."""
    conf: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                "--rdzv-conf", text, "KEY=VALUE pairs separated by commas", "e.g. timeout=900"
            )
        conf[key] = value
    return conf


def parse_std(text: str, flag: str, nproc: int) -> str:
    """``--redirects`` / ``--tee``: 0-3 for all ranks, or ``LOCAL_RANK:0-3,...``."""
    fix = f"use 0 (none), 1 (stdout), 2 (stderr) or 3 (both), e.g. {flag} 3 or {flag} 0:3,1:1"
    try:
        ranks = [rank for rank in std_values(text) if rank is not None]
    except ValueError:
        raise ConfigError(flag, text, "0, 1, 2, 3 or LOCAL_RANK:VALUE pairs", fix) from None
    if any(rank >= nproc for rank in ranks):
        raise ConfigError(flag, text, f"local ranks below {nproc}", fix)
    return text


def parse_ranks_filter(text: str, nproc: int) -> frozenset[int] | None:
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    fix = f"use comma-separated local ranks below {nproc}, e.g. --local-ranks-filter 0"
    if not all(p.isdigit() for p in parts):
        raise ConfigError("--local-ranks-filter", text, "comma-separated integers", fix)
    ranks = frozenset(int(p) for p in parts)
    if max(ranks) >= nproc:
        raise ConfigError("--local-ranks-filter", text, f"local ranks below {nproc}", fix)
    return ranks


def parse_num_workers(value: str | int | None, launcher: str) -> tuple[int, int] | None:
    """``--num-workers N``, or ``MIN:MAX`` (elastic; Ray launcher only) -> (min, max)."""
    if value is None:
        return None
    text = str(value).strip()
    fix = "e.g. --num-workers 4, or --num-workers 2:4 with --launcher ray"
    low, high = parse_range("--num-workers", text, fix)
    if low != high and launcher != "ray":
        raise ConfigError("--num-workers", text, "MIN:MAX only with --launcher ray",
                          "use --nnodes MIN:MAX with --rdzv-backend c10d for the local launcher")
    return low, high


def check_entrypoint(script: str | None, *, module: bool, no_python: bool) -> str:
    if not script:
        raise ConfigError(
            "script", script, "a training script (or -m module)", "e.g. distrain launch train.py"
        )
    if module and no_python:
        raise ConfigError("-m/--no-python", script, "one of them", "drop --no-python or -m")
    if module:
        try:
            found = importlib.util.find_spec(script) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(
                "-m", script, "an importable module", "check the name and that it is on PYTHONPATH"
            )
        return script
    if no_python:
        return script
    path = Path(script)
    if not path.exists():
        raise ConfigError("script", script, "an existing file", "check the path")
    if path.is_dir():
        raise ConfigError("script", script, "a Python file, not a directory", "name the .py file")
    return script


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# -- the config --------------------------------------------------------------------------------


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
    if args.cpu_affinity not in CPU_AFFINITY_MODES:
        raise ConfigError(
            "--cpu-affinity", args.cpu_affinity, " or ".join(CPU_AFFINITY_MODES),
            "use --cpu-affinity none to leave placement to the scheduler",
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
        cpu_affinity=args.cpu_affinity,
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
