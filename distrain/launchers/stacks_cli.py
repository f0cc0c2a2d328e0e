"""``distrain stacks [PID|RUN_ID]``: print every rank's current stack of a running launch.

The launch is found in this host's registry (``$TMPDIR/distrain-launches/<launcher pid>.json``,
written by the hang watch); with no argument, the only running one. The run goes on. Sending
SIGUSR1 to the launcher does the same, printed by the launcher itself. A Ray launch's ranks may
be on other machines: for one, this sends the launcher SIGUSR1 and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distrain.errors import ConfigError, OneLineParser
from distrain.launchers.stack_collect import collect
from distrain.launchers.watchdog import current_beats, is_alive, registry_dir, stacks_text


def running_launches() -> list[dict[str, Any]]:
    """The registry's entries whose launcher is still alive."""
    found = []
    for path in sorted(registry_dir().glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(entry, dict) and is_alive(int(entry.get("pid", -1))):
            found.append(entry)
    return found


def find_launch(wanted: str | None) -> dict[str, Any]:
    launches = running_launches()
    if wanted is None:
        if len(launches) == 1:
            return launches[0]
        listed = ", ".join(f"{e['pid']} ({e['run_id']})" for e in launches) or "none"
        raise ConfigError("launch", "(not given)", "exactly one running distrain launch on this "
                          f"host (running: {listed})", "pass the launcher's pid or run id")
    for entry in launches:
        if wanted in (str(entry.get("pid")), entry.get("run_id")):
            return entry
    raise ConfigError("launch", wanted, "the pid or run id of a running distrain launch on this "
                      "host", "see `ps` for the launcher's pid, or run `distrain stacks` alone")


def main(argv: Sequence[str]) -> int:
    parser = OneLineParser(prog="distrain stacks", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("launch", nargs="?", default=None, help="launcher pid or run id")
    parser.add_argument("--no-native", action="store_true", help="skip py-spy's native frames")
    args = parser.parse_args(list(argv))
    entry = find_launch(args.launch)
    if not entry.get("local", True):
        os.kill(int(entry["pid"]), signal.SIGUSR1)
        print(f"distrain stacks: launch {entry['pid']} ({entry['run_id']}) runs on Ray; it prints "
              "every rank's stack on its own console", file=sys.stderr)
        return 0
    watch_dir = Path(entry["watch_dir"])
    beats = current_beats(watch_dir)
    if not beats:
        print(f"distrain stacks: launch {entry['pid']} has no running rank yet", file=sys.stderr)
        return 1
    stacks = collect(watch_dir, beats, native=not args.no_native)
    print(stacks_text(stacks, beats, native=not args.no_native), flush=True)
    return 0
