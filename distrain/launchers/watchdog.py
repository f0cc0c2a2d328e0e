"""The launcher's watch over its workers: hangs, stacks on demand, stragglers.

A thread in the launcher reads every rank's heartbeat (:mod:`distrain.heartbeat`) twice a second.

* Hang: once any rank has reported progress, ``hang_timeout`` seconds without progress on any
  rank make it collect the stacks of every rank (:mod:`stack_collect`), decide which rank is stuck
  (:mod:`hang_report`), write one file per rank and SIGKILL the workers: the agent then sees
  the group fail and applies ``--max-restarts`` as for any failure.
* SIGUSR1 to the launcher (or ``distrain stacks``) prints every rank's stack; the run goes on.
* Stragglers: :class:`~distrain.launchers.straggler.StragglerTracker`.

Where the heartbeats and stacks come from is a :class:`RankSource`: the local launcher's ranks
write into the watch directory on this host (:class:`LocalRanks`); the Ray launcher's ranks write
on their own nodes and are read through their actors (:mod:`distrain.launchers.ray_watch`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from distrain.heartbeat import COLLECTED, WATCH_DIR_ENV, Beat, read_beats
from distrain.launchers.hang_report import Diagnosis, diagnose
from distrain.launchers.stack_collect import RankStacks, collect
from distrain.launchers.straggler import StragglerTracker
from distrain.signals import installed

POLL_S = 0.5
REGISTRY_DIR = "distrain-launches"
FLIGHT_RECORDER_ENTRIES = "2000"
FLIGHT_RECORDER_ENV = "TORCH_FR_BUFFER_SIZE"
# The variables the watch adds to the workers' environment (beyond torchrun's).
WATCH_ENV_KEYS = frozenset({WATCH_DIR_ENV, FLIGHT_RECORDER_ENV})


def registry_dir() -> Path:
    return Path(tempfile.gettempdir()) / REGISTRY_DIR


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def current_beats(watch_dir: Path) -> dict[int, Beat]:
    """The live ranks of the newest restart attempt."""
    beats = read_beats(watch_dir)
    if not beats:
        return {}
    attempt = max(beat.attempt for beat in beats.values())
    return {rank: beat for rank, beat in beats.items()
            if beat.attempt == attempt and is_alive(beat.pid)}


def write_stack_files(folder: Path, stacks: dict[int, RankStacks]) -> list[str]:
    """One text file per rank (Python stacks of every thread, native frames) plus its record."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, found in stacks.items():
        path = folder / f"rank{rank}.txt"
        parts = [f"rank {rank}, pid {found.pid}, host {found.host}\n\n", found.python or
                 "(no Python stack: the rank did not answer its dump signal)\n"]
        if found.native:
            parts += ["\n--- py-spy dump --native ---\n", found.native]
        path.write_text("".join(parts))
        if found.record is not None:
            (folder / f"rank{rank}.collectives.json").write_text(json.dumps(found.record, indent=1))
        written.append(str(path))
    return written


def stacks_text(stacks: dict[int, RankStacks], beats: dict[int, Beat], *,
                native: bool = False) -> str:
    """Every rank's Python stacks (and native frames with ``native``), rank by rank."""
    lines = []
    for rank, found in stacks.items():
        beat = beats.get(rank)
        state = f", {beat.phase}, {beat.steps} steps" if beat is not None else ""
        lines.append(f"--- rank {rank} (pid {found.pid} on {found.host}{state}) ---")
        lines.append(found.python.rstrip() or "(no answer to the dump signal)")
        if native and found.native:
            lines += ["  py-spy dump --native:", found.native.rstrip()]
    return "\n".join(lines)


class RankSource(Protocol):
    """Where the watch reads the ranks' heartbeats and gets their stacks from."""

    #: False when the ranks are not on this host (``distrain stacks`` then asks the launcher).
    local: bool

    def beats(self) -> dict[int, Beat]:
        """The live ranks of the newest attempt."""
        ...

    def collect(self, beats: dict[int, Beat], *, native: bool = True) -> dict[int, RankStacks]:
        ...

    def collected(self, attempt: int) -> None:
        """Tell ranks whose collective timed out that their stacks are in (they may exit)."""
        ...

    def kill(self, beats: dict[int, Beat]) -> None:
        """SIGKILL every rank in ``beats`` (the agent or the Ray group then sees them fail)."""
        ...


class LocalRanks:
    """Ranks on this host, beating into ``watch_dir``."""

    local = True

    def __init__(self, watch_dir: Path) -> None:
        self.watch_dir = watch_dir

    def beats(self) -> dict[int, Beat]:
        return current_beats(self.watch_dir)

    def collect(self, beats: dict[int, Beat], *, native: bool = True) -> dict[int, RankStacks]:
        return collect(self.watch_dir, beats, native=native)

    def collected(self, attempt: int) -> None:
        (self.watch_dir / COLLECTED.format(attempt=attempt)).touch()

    def kill(self, beats: dict[int, Beat]) -> None:
        for beat in beats.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(beat.pid, signal.SIGKILL)


class HangWatch:
    """Watches one launch's workers (see the module docstring)."""

    def __init__(self, *, hang_timeout: float, log_dir: str | None, max_restarts: int,
                 source: RankSource | None = None) -> None:
        self.hang_timeout = hang_timeout
        self.max_restarts = max_restarts
        self.watch_dir = Path(tempfile.mkdtemp(prefix="distrain-watch-"))
        self.source: RankSource = source if source is not None else LocalRanks(self.watch_dir)
        self.report_root = Path(log_dir) / "stacks" if log_dir else self.watch_dir / "stacks"
        self.keep_watch_dir = False
        self.diagnosis = ""  # the last hang's summary, for the final failure summary
        self.run_id = ""
        self.stragglers = StragglerTracker(self.watch_dir)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._dump_requested = threading.Event()
        self._dumps = 0
        self._thread = threading.Thread(target=self._run, name="distrain-watch", daemon=True)

    def environ(self) -> dict[str, str]:
        """What the workers need: where to beat, and a Flight Recorder for their collectives."""
        changes = {WATCH_DIR_ENV: str(self.watch_dir)}
        if FLIGHT_RECORDER_ENV not in os.environ:
            changes[FLIGHT_RECORDER_ENV] = FLIGHT_RECORDER_ENTRIES
        return changes

    def set_run_id(self, run_id: str) -> None:
        self.run_id = run_id
        registry = registry_dir()
        registry.mkdir(parents=True, exist_ok=True)
        entry = registry / f"{os.getpid()}.json"
        entry.write_text(json.dumps({"pid": os.getpid(), "run_id": run_id,
                                     "watch_dir": str(self.watch_dir),
                                     "local": self.source.local}))

    def request_stacks(self, *_: object) -> None:
        """SIGUSR1 handler: only sets events (the watch thread does the work)."""
        self._dump_requested.set()
        self._wake.set()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        attempt, seen, last_progress, fired = -1, {}, time.monotonic(), set()  # type: ignore[var-annotated]
        while not self._stop.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            beats = self.source.beats()
            if self._dump_requested.is_set():
                self._dump_requested.clear()
                self._print_stacks(beats)
            if not beats:
                continue
            newest = max(beat.attempt for beat in beats.values())
            if newest != attempt:
                attempt, seen, last_progress = newest, {}, time.monotonic()
                self.stragglers.reset()
            events = {rank: beat.events for rank, beat in beats.items()}
            if any(seen.get(rank) != count for rank, count in events.items()):
                last_progress = time.monotonic()
            seen = events
            self.stragglers.observe(beats)
            if attempt not in fired and any(b.phase == "collective timeout" for b in beats.values()):
                fired.add(attempt)
                self._on_collective_timeout(beats, attempt)
            # Armed from the first progress until every rank has finished (a slow exit is no hang).
            armed = any(count > 0 for count in events.values()) and \
                any(beat.phase != "finished" for beat in beats.values())
            stalled = time.monotonic() - last_progress
            if self.hang_timeout > 0 and armed and attempt not in fired \
                    and stalled > self.hang_timeout:
                fired.add(attempt)
                self._on_hang(beats, attempt, stalled)

    def _print_stacks(self, beats: dict[int, Beat]) -> None:
        self._dumps += 1
        stacks = self.source.collect(beats)
        folder = self.report_root / f"dump{self._dumps}"
        write_stack_files(folder, stacks)
        self.keep_watch_dir = True
        print(f"distrain: stacks of every rank (the run goes on; files in {folder}):\n"
              f"{stacks_text(stacks, beats)}", file=sys.stderr, flush=True)

    def _collect_and_diagnose(self, beats: dict[int, Beat], attempt: int,
                              kind: str) -> tuple[Diagnosis, Path, list[str]]:
        stacks = self.source.collect(beats)
        self.source.collected(attempt)
        folder = self.report_root / f"{kind}-attempt{attempt}"
        files = write_stack_files(folder, stacks)
        self.keep_watch_dir = True
        return diagnose(stacks, beats), folder, files

    def _on_collective_timeout(self, beats: dict[int, Beat], attempt: int) -> None:
        found, folder, files = self._collect_and_diagnose(beats, attempt, "timeout")
        timed_out = sorted(r for r, b in beats.items() if b.phase == "collective timeout")
        head = (f"distrain: a collective timed out on {'rank' if len(timed_out) == 1 else 'ranks'}"
                f" {', '.join(map(str, timed_out))}; the stuck rank(s) first:")
        self.diagnosis = "\n".join([head, *found.lines(), files_line(folder, files)])
        if attempt < self.max_restarts:
            print(self.diagnosis, file=sys.stderr, flush=True)

    def _on_hang(self, beats: dict[int, Beat], attempt: int, stalled: float) -> None:
        found, folder, files = self._collect_and_diagnose(beats, attempt, "hang")
        self.diagnosis = hang_summary(found, stalled=stalled, timeout=self.hang_timeout,
                                      folder=folder, files=files)
        self.source.kill(beats)
        if attempt < self.max_restarts:
            print(f"{self.diagnosis}\ndistrain: stopped the hung group; restarting it "
                  f"({attempt + 1} of {self.max_restarts}).", file=sys.stderr, flush=True)
        else:
            print("distrain: hang detected; stacks collected, workers stopped (summary follows).",
                  file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with contextlib.suppress(OSError):
            (registry_dir() / f"{os.getpid()}.json").unlink()
        if self.report_root.is_relative_to(self.watch_dir) and self.keep_watch_dir:
            print(f"distrain: stack files kept in {self.report_root}", file=sys.stderr, flush=True)
            for path in self.watch_dir.iterdir():
                if path.name != "stacks":
                    with contextlib.suppress(OSError):
                        path.unlink()
        else:
            shutil.rmtree(self.watch_dir, ignore_errors=True)


def hang_summary(found: Diagnosis, *, stalled: float, timeout: float, folder: Path,
                 files: list[str]) -> str:
    lines = [f"distrain: hang: no rank made progress for {stalled:.0f} s "
             f"(--hang-timeout {timeout:g}); the stuck rank(s) first:"]
    lines += found.lines()
    lines.append(files_line(folder, files))
    return "\n".join(lines)


def files_line(folder: Path, files: list[str]) -> str:
    return f"  full stacks, one file per rank: {folder}/ ({', '.join(Path(f).name for f in files)})"


@contextlib.contextmanager
def watching(*, hang_timeout: float, log_dir: str | None, max_restarts: int,
             source: RankSource | None = None) -> Iterator[HangWatch]:
    """A started :class:`HangWatch` with SIGUSR1 routed to it (main thread only)."""
    watch = HangWatch(hang_timeout=hang_timeout, log_dir=log_dir, max_restarts=max_restarts,
                      source=source)
    with installed([signal.SIGUSR1], watch.request_stacks):
        watch.start()
        try:
            yield watch
        finally:
            watch.stop()
