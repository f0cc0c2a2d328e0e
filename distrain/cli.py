"""The ``distrain`` command: ``launch``, ``env``, ``ckpt``, ``report``. Thin: parse and dispatch.

Bad input prints one line naming the value, what was expected and the fix, and exits 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from distrain.errors import EXIT_FAILED, EXIT_USAGE, ConfigError, OneLineParser, signal_exit, usage_error


def _launch(argv: Sequence[str]) -> int:
    from distrain.launch import launch
    from distrain.launch_cli import (
        blame_environment,
        config_from_args,
        misplaced_launcher_options,
        parse_launch_args,
    )

    try:
        args = parse_launch_args(argv, environ=os.environ)
        config = config_from_args(args)
    except ConfigError as error:
        return usage_error("distrain launch", blame_environment(str(error), error.what, argv, os.environ))
    misplaced = misplaced_launcher_options(args.training_script_args)
    if misplaced:
        print(f"distrain launch: warning: {' '.join(misplaced)} after {args.training_script} went to the "
              f"script, not the launcher; put launcher options first: distrain launch {misplaced[0]} ... "
              f"{args.training_script}", file=sys.stderr, flush=True)
    try:
        result = launch(config)
    finally:
        from distrain.launchers.preload import stop_resource_tracker

        stop_resource_tracker()  # no helper process outlives the command
    if result.ok:
        return 0
    print(result.summary(), file=sys.stderr, flush=True)
    if result.signal:
        return signal_exit(result.signal)
    return EXIT_FAILED


def _env(argv: Sequence[str]) -> int:
    from distrain.envinfo import main as env_main

    return env_main(argv)


def _subcommand(module: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        import importlib

        main: Callable[[Sequence[str]], int] = importlib.import_module(module).main
        return main(argv)

    return run


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "launch": (_launch, "start distributed workers (torchrun-compatible)"),
    "env": (_env, "versions, devices and backends of this machine"),
    "ckpt": (_subcommand("distrain.ckpt.cli"), "list, inspect, verify, export checkpoints"),
    "report": (_subcommand("distrain.logging.report"), "draw a run's TensorBoard curves to PNG"),
    "stacks": (_subcommand("distrain.launchers.stacks_cli"),
               "print every rank's stack of a running launch (it goes on)"),
    "requeue": (_subcommand("distrain.requeue"), "requeue this SLURM job after preemption (bounded)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(prog="distrain", description="Distributed PyTorch training.")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                        help=", ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else EXIT_USAGE
    if argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # exits 2 with a one-line error
    handler = COMMANDS[argv[0]][0]
    try:
        return handler(argv[1:])
    except ConfigError as error:
        return usage_error(f"distrain {argv[0]}", error)
    except KeyboardInterrupt:
        return signal_exit("SIGINT")


if __name__ == "__main__":
    raise SystemExit(main())
