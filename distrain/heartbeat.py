"""The per-rank heartbeat: a small memory-mapped file each worker updates and its launcher reads.

A worker's progress must be visible to the launcher without a collective (a hung group cannot run
one) and without a system call per training step: each rank maps one fixed-size file in the run's
watch directory and stores plain numbers into it; the launcher maps the same file read-only. The
layout is fixed (``struct``) and versioned by a magic number; nothing here imports torch.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

WATCH_DIR_ENV = "DISTRAIN_WATCH_DIR"
PERF_FILE = "perf.json"  # the launcher's straggler figures, read by rank 0's TBLogger
MAGIC = 0x44544842  # "DTHB"
# magic, pid, main thread id, restart attempt, rank, phase, steps, events, last event (wall),
# phase since (wall), last own step time, host name.
_LAYOUT = struct.Struct("<IiQiiiQQdddd64s")
SIZE = 256

# What a rank is doing, as the heartbeat records it.
PHASES = ("starting", "running", "forward", "backward", "data loading", "collective",
          "checkpoint", "collective timeout", "finished")
COLLECTED = "collected-attempt{attempt}"  # the launcher's note that it has every rank's stacks
PHASE_CODES = {name: code for code, name in enumerate(PHASES)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Beat:
    """One reading of a rank's heartbeat."""

    pid: int
    main_thread: int
    attempt: int
    rank: int
    phase: str
    steps: int  # training steps completed (backward passes of a wrapped model)
    events: int  # any progress: forward, backward, a batch, a collective, a checkpoint
    last_event: float  # wall-clock time of the last event
    phase_since: float
    step_time: float  # the last step's own time: from the previous step's end to this backward
    step_started: float
    host: str


def beat_path(watch_dir: str | os.PathLike[str], rank: int) -> Path:
    return Path(watch_dir) / f"rank{rank}.beat"


class BeatWriter:
    """The worker's side: stores into its mapped heartbeat file (no system call per update)."""

    __slots__ = ("_map", "_values")

    def __init__(self, path: Path, *, rank: int, attempt: int, main_thread: int, host: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self._values: list[object] = [
            0, os.getpid(), main_thread, attempt, rank, 0, 0, 0, 0.0, 0.0, 0.0, 0.0,
            host.encode()[:64],
        ]
        self._store()
        self._values[0] = MAGIC  # written last: a reader never sees a half-initialised beat
        self._store()

    def update(self, *, phase: str | None = None, step: bool = False, event: bool = True,
               now: float, step_time: float | None = None, step_started: float | None = None) -> None:
        values = self._values
        if phase is not None:
            values[5] = PHASE_CODES[phase]
            values[9] = now
        if step:
            values[6] = int(values[6]) + 1  # type: ignore[call-overload]
        if event:
            values[7] = int(values[7]) + 1  # type: ignore[call-overload]
            values[8] = now
        if step_time is not None:
            values[10] = step_time
        if step_started is not None:
            values[11] = step_started
        self._store()

    def _store(self) -> None:
        _LAYOUT.pack_into(self._map, 0, *self._values)


def read_beat(path: Path) -> Beat | None:
    """The heartbeat in ``path``, or None when it is missing, short or not initialised yet."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(_LAYOUT.size)
    except OSError:
        return None
    if len(data) < _LAYOUT.size:
        return None
    (magic, pid, main_thread, attempt, rank, phase, steps, events, last_event, phase_since,
     step_time, step_started, host) = _LAYOUT.unpack(data)
    if magic != MAGIC:
        return None
    return Beat(
        pid=pid, main_thread=main_thread, attempt=attempt, rank=rank,
        phase=PHASES[phase] if 0 <= phase < len(PHASES) else "running", steps=steps,
        events=events, last_event=last_event, phase_since=phase_since, step_time=step_time,
        step_started=step_started, host=host.rstrip(b"\0").decode(errors="replace"),
    )


def read_beats(watch_dir: str | os.PathLike[str]) -> dict[int, Beat]:
    """Every readable heartbeat in ``watch_dir``, by rank."""
    beats: dict[int, Beat] = {}
    for path in Path(watch_dir).glob("rank*.beat"):
        beat = read_beat(path)
        if beat is not None:
            beats[beat.rank] = beat
    return beats
