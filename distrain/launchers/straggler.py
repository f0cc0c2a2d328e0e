"""Straggler detection from the heartbeats: which rank's own step time stands out, and by how much.

A rank's *own* step time excludes the time it waited for its peers (see
:func:`distrain.stacks.watch_model`), so in synchronous training the slow rank shows as slow. The
launcher publishes the figures to ``perf.json`` in the watch directory (read by rank 0's
``TBLogger``) and warns once per episode: an episode starts when, over the last ``window`` steps,
the slowest rank's median exceeds ``ratio`` times the median of the other ranks, and ends when it
falls back under ``ratio``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distrain.heartbeat import PERF_FILE, Beat

# A rank is only warned about when it is also this much slower per step than the others: 1.6x a
# step of a millisecond is scheduling noise, not a straggler.
MIN_EXCESS_S = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class StragglerFigures:
    ratio: float  # slowest rank's median own step time over the median of the others
    slowest_rank: int
    slowest_time: float
    median_time: float
    host: str


def figures(samples: dict[int, deque[float]], hosts: dict[int, str],
            window: int) -> StragglerFigures | None:
    """The figures once every rank (two or more) has ``window`` steps; None before."""
    if len(samples) < 2 or any(len(s) < window for s in samples.values()):
        return None
    medians = {rank: statistics.median(list(s)[-window:]) for rank, s in samples.items()}
    slowest = max(medians, key=lambda rank: (medians[rank], -rank))
    others = statistics.median(v for rank, v in medians.items() if rank != slowest)
    if others <= 0:
        return None
    return StragglerFigures(ratio=medians[slowest] / others, slowest_rank=slowest,
                            slowest_time=medians[slowest], median_time=others,
                            host=hosts.get(slowest, "?"))


class StragglerTracker:
    """Feeds on heartbeats; publishes figures and warns once per episode."""

    __slots__ = ("_hosts", "_in_episode", "_perf_path", "_ratio", "_samples", "_steps", "_warn",
                 "_window", "published")

    def __init__(self, watch_dir: Path, *, ratio: float = 1.5, window: int = 5,
                 warn: Callable[[str], None] | None = None) -> None:
        self._perf_path = watch_dir / PERF_FILE
        self._ratio = ratio
        self._window = window
        self._warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
        self._samples: dict[int, deque[float]] = {}
        self._steps: dict[int, int] = {}
        self._hosts: dict[int, str] = {}
        self._in_episode = False
        self.published = 0

    def reset(self) -> None:
        """A new attempt: its ranks start from scratch."""
        self._samples.clear()
        self._steps.clear()
        self._in_episode = False

    def observe(self, beats: dict[int, Beat]) -> None:
        changed = False
        for rank, beat in beats.items():
            self._hosts[rank] = beat.host
            if beat.steps != self._steps.get(rank) and beat.step_time > 0:
                self._steps[rank] = beat.steps
                self._samples.setdefault(rank, deque(maxlen=self._window)).append(beat.step_time)
                changed = True
        if not changed:
            return
        found = figures(self._samples, self._hosts, self._window)
        if found is None:
            return
        self._publish(found)
        standing_out = found.ratio > self._ratio and \
            found.slowest_time - found.median_time >= MIN_EXCESS_S
        if standing_out and not self._in_episode:
            self._in_episode = True
            self._warn(
                f"distrain: rank {found.slowest_rank} on {found.host} is a straggler: its own step "
                f"time {found.slowest_time:.3g} s is {found.ratio:.1f}x the median of the other "
                f"ranks ({found.median_time:.3g} s) over the last {self._window} steps"
            )
        elif not standing_out:
            self._in_episode = False

    def _publish(self, found: StragglerFigures) -> None:
        self.published += 1
        temporary = self._perf_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({
            "seq": self.published, "step_time_max_over_median": found.ratio,
            "slowest_rank": found.slowest_rank,
        }))
        os.replace(temporary, self._perf_path)
