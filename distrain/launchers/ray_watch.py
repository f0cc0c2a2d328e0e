"""The hang watch for the Ray launcher: heartbeats and stacks read through the rank actors.

Each rank beats into a watch directory on its own node (the actor's temporary directory, see
:meth:`~distrain.launchers.ray_worker.RankWorker.start`); the launcher may be on another machine,
so :class:`RayRanks` (the :class:`~distrain.launchers.watchdog.RankSource` of a Ray launch) asks
every actor for its rank's beat, and on a hang has each actor collect its own rank's stacks
(``faulthandler``, the Flight Recorder, ``py-spy`` where installed on that node) and return them.
The functions below run inside the actors.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distrain.heartbeat import COLLECTED, Beat
from distrain.launchers.stack_collect import DUMP_WAIT_S, PY_SPY_TIMEOUT_S, RankStacks, collect
from distrain.launchers.watchdog import current_beats

BEAT_WAIT_S = 2.0  # an actor slower than this to answer keeps its previous reading
COLLECT_SLACK_S = 30.0  # beyond a rank's own bound: the round trip through Ray, a busy node


# ------------------------------------------------------------------------------ in the actor


def rank_beat(watch_dir: str) -> Beat | None:
    """The live rank's heartbeat in ``watch_dir`` (one rank per actor)."""
    if not Path(watch_dir).is_dir():
        return None
    return next(iter(current_beats(Path(watch_dir)).values()), None)


def rank_stacks(watch_dir: str, *, native: bool) -> RankStacks | None:
    beats = current_beats(Path(watch_dir)) if Path(watch_dir).is_dir() else {}
    if not beats:
        return None
    return next(iter(collect(watch_dir, beats, native=native).values()))


def mark_collected(watch_dir: str, attempt: int) -> None:
    if Path(watch_dir).is_dir():
        (Path(watch_dir) / COLLECTED.format(attempt=attempt)).touch()


# ------------------------------------------------------------------------------ in the launcher


class RayRanks:
    """The ranks of the running attempt, through their actors (see the module docstring)."""

    local = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._actors: tuple[Any, ...] = ()
        # The last reading of each rank: a busy actor's late answer must not drop its rank from
        # the watch (a missing rank would look like progress, or leave the stuck rank unnamed).
        self._last: dict[int, Beat] = {}

    def attach(self, actors: Sequence[Any]) -> None:
        """The started attempt's actors, by rank."""
        with self._lock:
            self._actors = tuple(actors)
            self._last = {}

    def detach(self) -> None:
        with self._lock:
            self._actors = ()
            self._last = {}

    def _by_rank(self) -> tuple[Any, ...]:
        with self._lock:
            return self._actors

    def beats(self) -> dict[int, Beat]:
        actors = self._by_rank()
        answers = _gather({actor.beat.remote(): rank for rank, actor in enumerate(actors)},
                          BEAT_WAIT_S)
        with self._lock:
            if actors is not self._actors:
                return {}  # the attempt ended while we asked
            for rank, beat in answers.items():
                if isinstance(beat, Beat):
                    self._last[rank] = beat
                else:  # no live rank behind this actor (not started, or exited)
                    self._last.pop(rank, None)
            return dict(self._last)

    def collect(self, beats: dict[int, Beat], *, native: bool = True) -> dict[int, RankStacks]:
        actors = self._by_rank()
        bound = DUMP_WAIT_S + (PY_SPY_TIMEOUT_S + 1 if native else 0) + COLLECT_SLACK_S
        answers = _gather({actors[rank].stacks.remote(native): rank
                           for rank in beats if rank < len(actors)}, bound)
        found: dict[int, RankStacks] = {}
        for rank, beat in sorted(beats.items()):
            answer = answers.get(rank)
            found[rank] = answer if isinstance(answer, RankStacks) else RankStacks(
                rank=rank, pid=beat.pid, host=beat.host, python="", record=None)
        return found

    def collected(self, attempt: int) -> None:
        for actor in self._by_rank():
            actor.collected.remote(attempt)

    def kill(self, beats: dict[int, Beat]) -> None:
        actors = self._by_rank()
        _gather({actors[rank].kill_rank.remote(): rank for rank in beats if rank < len(actors)},
                BEAT_WAIT_S)


def _gather(refs: dict[Any, int], timeout: float) -> dict[int, Any]:
    """The answers that came within ``timeout`` s, by rank; a dead actor's is left out."""
    import ray

    if not refs:
        return {}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    answers: dict[int, Any] = {}
    for ref in ready:
        try:
            answers[refs[ref]] = ray.get(ref)
        except ray.exceptions.RayError:
            continue
    return answers
