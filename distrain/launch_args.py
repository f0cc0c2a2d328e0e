"""The ``distrain launch`` flags: torchrun's, with the same names, spellings and meaning.

Every option accepts both ``--dash-case`` and ``--underscore_case``; an option not on the
command line is read from ``PET_<NAME>`` in the environment, as torchrun does
(``PET_NPROC_PER_NODE=2``). Parsing only: validation is :func:`distrain.launch.config_from_args`.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Mapping, Sequence
from typing import NoReturn

from distrain.errors import EXIT_USAGE

DEFAULT_START_METHOD = "forkserver"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (with "did you mean") and exit 2."""

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments" in message or "ambiguous option" in message:
            bad = message.split(":", 1)[-1].split()[0] if ":" in message else ""
            known = [s for a in self._actions for s in a.option_strings]
            close = difflib.get_close_matches(bad.split("=")[0], known, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]}?"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
                 "launcher", "monitor_interval", "term_timeout")


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

