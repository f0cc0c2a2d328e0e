"""Read collected stacks: which rank is stuck, where in the user's code, who waits and in what.

The decision, in order of evidence:

1. torch's Flight Recorder (every rank's record of the collectives it entered, with sequence
   numbers; gloo and NCCL): ranks with an open collective are *waiting*; a rank whose last
   collective is below the one they wait in never arrived: it is *stuck*.
2. Without a record, the stack: a main thread inside ``torch.distributed`` or autograd's
   backward (DDP's gradient all-reduce) is waiting; any other is stuck.

The stuck rank's location is the innermost frame of its main thread that is the user's code
(not the standard library, site-packages or distrain).
"""

from __future__ import annotations

import linecache
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from distrain.heartbeat import Beat
from distrain.launchers.stack_collect import RankStacks

_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-fA-F]+)")
_FRAME = re.compile(r'^\s+File "(?P<file>.+)", line (?P<line>\d+) in (?P<func>.+)$')
_LIBRARY_DIRS = tuple(
    os.path.realpath(path) + os.sep
    for path in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
                 sysconfig.get_paths()["platlib"],
                 str(Path(__file__).resolve().parents[1])}  # distrain itself
)
_WAITING_FILES = ("torch/distributed/", "torch/autograd/", "torch/_tensor.py",
                  "torch/nn/parallel/distributed.py")


@dataclass(frozen=True, slots=True)
class Frame:
    file: str
    line: int
    function: str

    def where(self) -> str:
        code = linecache.getline(self.file, self.line).strip()
        place = f"{self.file}:{self.line} in {self.function}"
        return f"{place}: {code}" if code else place


@dataclass(frozen=True, slots=True, kw_only=True)
class Thread:
    ident: int
    current: bool
    frames: tuple[Frame, ...]  # most recent call first


def parse_faulthandler(text: str) -> list[Thread]:
    """faulthandler's dump -> threads; the last dump in ``text`` wins when there are several."""
    threads: list[Thread] = []
    ident, current, frames = -1, False, []  # type: tuple[int, bool, list[Frame]]
    for line in text.splitlines():
        head = _THREAD.match(line)
        if head:
            if ident >= 0:
                threads.append(Thread(ident=ident, current=current, frames=tuple(frames)))
            ident, current, frames = int(head.group(2), 16), head.group(1) == "Current thread", []
            continue
        frame = _FRAME.match(line)
        if frame and ident >= 0:
            frames.append(Frame(frame["file"], int(frame["line"]), frame["func"].strip()))
    if ident >= 0:
        threads.append(Thread(ident=ident, current=current, frames=tuple(frames)))
    return threads


def main_frames(stacks: RankStacks, beat: Beat | None) -> tuple[Frame, ...]:
    threads = parse_faulthandler(stacks.python)
    for thread in threads:
        if beat is not None and thread.ident == beat.main_thread:
            return thread.frames
    current = [t for t in threads if t.current]
    return (current or threads)[0].frames if threads else ()


def is_user_file(path: str) -> bool:
    if path.startswith("<"):
        return False
    return not os.path.realpath(path).startswith(_LIBRARY_DIRS)


def user_frame(frames: tuple[Frame, ...]) -> Frame | None:
    return next((frame for frame in frames if is_user_file(frame.file)), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenCollective:
    seq: int
    name: str  # all_reduce, barrier, broadcast, ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordSummary:
    last_seq: int  # the highest collective sequence number this rank entered
    open: OpenCollective | None  # the collective it is inside now
    last: OpenCollective | None = None  # the last one it entered, finished or not


def summarise_record(record: dict[str, object] | None) -> RecordSummary | None:
    """The default group's entries of a Flight Recorder dump; None without usable entries."""
    entries = record.get("entries") if isinstance(record, dict) else None
    if not isinstance(entries, list):
        return None
    ours = [e for e in entries if isinstance(e, dict) and not e.get("is_p2p")
            and e.get("pg_id", 0) == 0 and isinstance(e.get("collective_seq_id"), int)]
    if not ours:
        return RecordSummary(last_seq=0, open=None)
    last = max(ours, key=lambda e: int(e["collective_seq_id"]))
    unfinished = [e for e in ours if not e.get("retired", True)
                  and e.get("state") != "completed"]
    opened = max(unfinished, key=lambda e: int(e["collective_seq_id"])) if unfinished else None
    return RecordSummary(
        last_seq=int(last["collective_seq_id"]),
        last=_collective(last),
        open=None if opened is None else _collective(opened),
    )


def _collective(entry: dict[str, object]) -> OpenCollective:
    return OpenCollective(seq=int(str(entry["collective_seq_id"])),
                          name=str(entry.get("profiling_name", "collective")).split(":")[-1])


@dataclass(frozen=True, slots=True, kw_only=True)
class RankState:
    rank: int
    host: str
    pid: int
    phase: str
    waiting: bool
    collective: OpenCollective | None
    in_backward: bool
    at: Frame | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnosis:
    stuck: tuple[RankState, ...]
    waiting: tuple[RankState, ...]
    how: str
    files: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        out = []
        for state in self.stuck:
            where = state.at.where() if state.at else "(no frame of the script's own code)"
            out.append(f"  stuck: rank {state.rank} (pid {state.pid} on {state.host}, "
                       f"{state.phase}) at {where}")
        for state in self.waiting:
            what = "a collective"
            if state.collective is not None:
                what = f"{state.collective.name} (collective #{state.collective.seq})"
            if state.in_backward:
                what += " in backward"
            where = f" at {state.at.where()}" if state.at else ""
            out.append(f"  waiting: rank {state.rank} (on {state.host}) in {what}{where}")
        out.append(f"  how: {self.how}")
        return out


def _rank_state(stacks: RankStacks, beat: Beat | None,
                record: RecordSummary | None) -> RankState:
    frames = main_frames(stacks, beat)
    at = user_frame(frames)
    # Only what the user's code called into counts (the launcher's own frames lie below it).
    called = frames[:frames.index(at)] if at is not None else frames
    in_library_wait = any(marker in frame.file.replace(os.sep, "/")
                          for frame in called for marker in _WAITING_FILES)
    timed_out = beat is not None and beat.phase == "collective timeout"
    collective = record.open if record is not None else None
    if timed_out:
        waiting = True  # its wait ended with the timeout; it is on its way out
        collective = collective or (record.last if record is not None else None)
    elif record is not None:
        waiting = record.open is not None
    else:
        waiting = in_library_wait or (beat is not None and beat.phase == "collective")
    return RankState(
        rank=stacks.rank, host=stacks.host, pid=stacks.pid,
        phase=beat.phase if beat is not None else "unknown", waiting=waiting,
        collective=collective,
        in_backward=any(f.function == "backward" or "_engine_run_backward" in f.function
                        for f in called),
        at=at,
    )


def diagnose(stacks: dict[int, RankStacks], beats: dict[int, Beat]) -> Diagnosis:
    records = {rank: summarise_record(s.record) for rank, s in stacks.items()}
    states = [_rank_state(s, beats.get(rank), records[rank]) for rank, s in sorted(stacks.items())]
    stuck = tuple(s for s in states if not s.waiting)
    waiting = tuple(s for s in states if s.waiting)
    return Diagnosis(stuck=stuck, waiting=waiting, how=_how(stuck, waiting, records))


def _names(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _how(stuck: tuple[RankState, ...], waiting: tuple[RankState, ...],
         records: dict[int, RecordSummary | None]) -> str:
    opened = [s.collective for s in waiting if s.collective is not None]
    if stuck and opened:
        target = max(opened, key=lambda c: c.seq)
        behind = [s.rank for s in stuck if (r := records.get(s.rank)) is not None
                  and r.last_seq < target.seq]
        waiters = [s.rank for s in waiting if s.collective and s.collective.seq == target.seq]
        if behind:
            return (f"{_names(behind)} never entered collective #{target.seq} ({target.name}) "
                    f"that {_names(waiters)} {'is' if len(waiters) == 1 else 'are'} waiting in "
                    "(torch Flight Recorder).")
    if stuck and waiting:
        return (f"{_names([s.rank for s in stuck])} {'is' if len(stuck) == 1 else 'are'} not "
                f"inside a collective while {_names([s.rank for s in waiting])} "
                f"{'waits' if len(waiting) == 1 else 'wait'} in one (stacks).")
    if not stuck and len({c.seq for c in opened}) > 1:
        parts = ", ".join(f"rank {s.rank} #{s.collective.seq} {s.collective.name}"
                          for s in waiting if s.collective)
        return f"the ranks wait in different collectives ({parts}): mismatched collective calls."
    if not stuck:
        return ("every rank is inside the same collective: the communication itself hangs "
                "(network, NCCL/gloo), not one rank's code.")
    return "no rank is inside a collective: every rank is stuck in its own code (stacks)."
