"""Collect the stacks (and collective record) of every watched rank on this host, now.

Each rank's ``faulthandler`` (registered by :mod:`distrain.stacks`) appends the Python stack of
all its threads to ``rankN.stacks`` when signalled; its request thread writes torch's Flight
Recorder to ``rankN.fr.json``; where ``py-spy`` is installed, ``py-spy dump --native`` adds the
native frames. Used by the hang watch, by SIGUSR1 to the launcher and by ``distrain stacks``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrain.heartbeat import Beat
from distrain.stacks import DUMP_SIGNAL, record_path, request_path, stack_path

DUMP_WAIT_S = 3.0  # for a rank's dump handlers; a dump takes milliseconds when they can run
PY_SPY_TIMEOUT_S = 6.0
_SETTLED_S = 0.2  # the stack file stopped growing for this long: the dump is complete


@dataclass(frozen=True, slots=True, kw_only=True)
class RankStacks:
    """What one rank was doing when it was asked."""

    rank: int
    pid: int
    host: str
    python: str  # faulthandler's text: every thread, most recent call first
    record: dict[str, Any] | None  # the Flight Recorder, when the rank could write it
    native: str = ""  # py-spy dump --native, where installed


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _ask_record(watch_dir: Path, rank: int) -> None:
    with contextlib.suppress(OSError):
        record_path(watch_dir, rank).unlink()  # what is there after the request is the answer
    with contextlib.suppress(OSError):
        fd = os.open(request_path(watch_dir, rank), os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"d")
        finally:
            os.close(fd)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def py_spy_path() -> str | None:
    """``py-spy`` on PATH or next to this interpreter (a virtualenv's bin/), if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if os.access(beside, os.X_OK) else None)


def _py_spy(pid: int, found: dict[int, str]) -> None:
    executable = py_spy_path()
    if executable is None:
        return
    try:
        done = subprocess.run([executable, "dump", "--native", "--pid", str(pid)],
                              capture_output=True, text=True, timeout=PY_SPY_TIMEOUT_S, check=False)
        found[pid] = done.stdout if done.returncode == 0 else done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        found[pid] = f"py-spy failed: {error}"


def collect(watch_dir: str | os.PathLike[str], beats: dict[int, Beat], *,
            native: bool = True) -> dict[int, RankStacks]:
    """Signal every rank in ``beats`` and gather what each one wrote (bounded in time)."""
    root = Path(watch_dir)
    started = time.time()
    sizes = {rank: _file_size(stack_path(root, rank)) for rank in beats}
    for rank, beat in beats.items():
        _ask_record(root, rank)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(beat.pid, DUMP_SIGNAL)
    texts, records = _wait_for_dumps(root, beats, sizes, started)
    # After the dumps: py-spy stops the process while it reads it, dump threads included.
    natives: dict[int, str] = {}
    spies = [threading.Thread(target=_py_spy, args=(beat.pid, natives), daemon=True)
             for beat in beats.values()] if native else []
    for spy in spies:
        spy.start()
    for spy in spies:
        spy.join(PY_SPY_TIMEOUT_S + 1)
    return {
        rank: RankStacks(rank=rank, pid=beat.pid, host=beat.host, python=texts.get(rank, ""),
                         record=records.get(rank), native=natives.get(beat.pid, ""))
        for rank, beat in sorted(beats.items())
    }


def _wait_for_dumps(root: Path, beats: dict[int, Beat], sizes: dict[int, int],
                    started: float) -> tuple[dict[int, str], dict[int, dict[str, Any]]]:
    texts: dict[int, str] = {}
    records: dict[int, dict[str, Any]] = {}
    last_size = dict(sizes)
    grew_at: dict[int, float] = {}
    deadline = started + DUMP_WAIT_S
    while time.time() < deadline:
        now = time.time()
        for rank in beats:
            size = _file_size(stack_path(root, rank))
            if size != last_size[rank]:
                last_size[rank], grew_at[rank] = size, now
            if rank not in records:
                record = _read_record(record_path(root, rank))
                if record is not None:
                    records[rank] = record
        stacks_done = all(rank in grew_at and now - grew_at[rank] >= _SETTLED_S for rank in beats)
        if stacks_done and len(records) == len(beats):
            break
        time.sleep(0.05)
    for rank in beats:
        with contextlib.suppress(OSError), open(stack_path(root, rank), errors="replace") as handle:
            handle.seek(sizes[rank])
            texts[rank] = handle.read()
    return texts, records
