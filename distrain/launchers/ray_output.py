"""Where the Ray launcher puts each rank's output: the console, per-rank files, a tail in memory.

The console gets ``[rankN]:line`` (the local launcher's prefix), stdout lines on stdout and
stderr lines on stderr, filtered like the local launcher by ``--local-ranks-filter`` and
``--redirects``/``--tee``. With ``--log-dir DIR`` every line also goes to
``DIR/<run id>/attempt_<n>/<rank>/{stdout,stderr}.log`` on the launcher's machine (the lines
come back through Ray, so this works for remote nodes too). The last lines of each rank are
kept for the failure summary.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from distrain.results import tail_text
from distrain.std_spec import std_value

if TYPE_CHECKING:
    from distrain.launch_config import LaunchConfig

TAIL_LINES = 20
_STREAM_BIT = {"stdout": 1, "stderr": 2}


def on_console(config: LaunchConfig, local_rank: int, stream: str) -> bool:
    """torchrun's rule: a stream shows unless redirected to a file and not tee'd back."""
    if config.local_ranks_filter is not None and local_rank not in config.local_ranks_filter:
        return False
    bit = _STREAM_BIT[stream]
    redirected = std_value(config.redirects, local_rank) & bit
    teed = std_value(config.tee, local_rank) & bit
    return not redirected or bool(teed)


class RankOutput:
    """One attempt's output sink for every rank."""

    def __init__(self, config: LaunchConfig, attempt_dir: Path | None) -> None:
        self._config = config
        self._dir = attempt_dir
        self._files: dict[tuple[int, str], IO[str]] = {}
        self._tails: dict[tuple[int, str], collections.deque[str]] = {}
        self._show: dict[tuple[int, str], bool] = {}

    def add_rank(self, rank: int, local_rank: int) -> None:
        for stream in ("stdout", "stderr"):
            key = (rank, stream)
            self._tails[key] = collections.deque(maxlen=TAIL_LINES)
            self._show[key] = on_console(self._config, local_rank, stream)
            if self._dir is not None:
                folder = self._dir / str(rank)
                folder.mkdir(parents=True, exist_ok=True)
                self._files[key] = open(folder / f"{stream}.log", "w", encoding="utf-8")  # noqa: SIM115

    def emit(self, rank: int, lines: Iterable[tuple[str, str]]) -> None:
        touched = set()
        for stream, line in lines:
            key = (rank, stream)
            self._tails[key].append(line)
            if self._show[key]:
                console = sys.stdout if stream == "stdout" else sys.stderr
                console.write(f"[rank{rank}]:{line}\n")
                touched.add(console)
            file = self._files.get(key)
            if file is not None:
                file.write(line + "\n")
        for console in touched:
            console.flush()

    def tail(self, rank: int) -> str:
        """The last lines of stderr (where tracebacks go), else of stdout."""
        err = self._tails.get((rank, "stderr"))
        if err:
            return tail_text("\n".join(err), TAIL_LINES)
        out = self._tails.get((rank, "stdout"))
        return tail_text("\n".join(out), TAIL_LINES) if out else ""

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()
