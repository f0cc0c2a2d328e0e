"""Straggler figures for TensorBoard: what the launcher's watch published, logged by rank 0.

The launcher (``distrain/launchers/straggler.py``) writes ``perf.json`` in the run's watch
directory whenever it has new figures; :class:`PerfScalars` turns each new version into the
scalars ``perf/step_time_max_over_median`` and ``perf/slowest_rank`` at the step being logged.
It looks at the file at most every ``interval`` seconds; without a watching launcher it is idle.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from distrain.heartbeat import PERF_FILE, WATCH_DIR_ENV

TAGS = {"step_time_max_over_median": "perf/step_time_max_over_median",
        "slowest_rank": "perf/slowest_rank"}


class PerfScalars:
    """New straggler figures since the last call, as ``{tag: value}`` (empty when none)."""

    __slots__ = ("_checked", "_interval", "_path", "_seen")

    def __init__(self, *, interval: float = 0.5) -> None:
        watch_dir = os.environ.get(WATCH_DIR_ENV)
        self._path = Path(watch_dir) / PERF_FILE if watch_dir else None
        self._interval = interval
        self._checked = 0.0
        self._seen = 0

    def new(self) -> dict[str, float]:
        now = time.monotonic()
        if self._path is None or now - self._checked < self._interval:
            return {}
        self._checked = now
        try:
            figures = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(figures, dict) or figures.get("seq", 0) == self._seen:
            return {}
        self._seen = int(figures.get("seq", 0))
        return {tag: float(figures[key]) for key, tag in TAGS.items() if key in figures}
