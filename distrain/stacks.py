"""The worker's side of hang and straggler detection: heartbeat, stack dumps, collective record.

Under ``distrain launch`` (``DISTRAIN_WATCH_DIR`` set) every worker, at start:

* maps its heartbeat (:mod:`distrain.heartbeat`) and records progress there: the wrapped model's
  forward and backward, each batch of a distrain loader, distrain's collectives and checkpoints;
* registers :mod:`faulthandler` on :data:`DUMP_SIGNAL`: the launcher's signal makes the C-level
  handler append the Python stack of every thread to ``rankN.stacks``, even while the main
  thread is blocked inside a collective;
* starts a thread blocked on a FIFO (``rankN.req``): a byte from the launcher makes it write
  torch's Flight Recorder (which collectives this rank entered and which are still open) to
  ``rankN.fr.json``.

Without the variable (torchrun, no launcher) every function here is a cheap no-op. The state is
per process, like the process group: one heartbeat per worker.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distrain.heartbeat import COLLECTED, WATCH_DIR_ENV, BeatWriter, beat_path
from distrain.orphans import watch_launcher

DUMP_SIGNAL = signal.SIGUSR2
# How long a rank whose collective timed out waits for the launcher to collect every rank's
# stacks before it exits (its exit makes the agent stop the others, the stuck one included).
COLLECTION_WAIT_S = 20.0


def stack_path(watch_dir: str | os.PathLike[str], rank: int) -> Path:
    return Path(watch_dir) / f"rank{rank}.stacks"


def request_path(watch_dir: str | os.PathLike[str], rank: int) -> Path:
    return Path(watch_dir) / f"rank{rank}.req"


def record_path(watch_dir: str | os.PathLike[str], rank: int) -> Path:
    return Path(watch_dir) / f"rank{rank}.fr.json"


class _Watched:
    """This worker's heartbeat and dump handlers (one per process)."""

    __slots__ = ("attempt", "backward_end", "beat", "pid", "rank", "stacks_file", "watch_dir")

    def __init__(self, watch_dir: str, rank: int, attempt: int) -> None:
        self.watch_dir = watch_dir
        self.attempt = attempt
        self.rank = rank
        self.pid = os.getpid()
        self.backward_end = 0.0
        # Append: the launcher notes the size before it signals and reads what was added.
        self.stacks_file = open(stack_path(watch_dir, rank), "a")  # noqa: SIM115 - kept open for the handler
        faulthandler.register(DUMP_SIGNAL, file=self.stacks_file, all_threads=True, chain=False)
        self.beat = BeatWriter(beat_path(watch_dir, rank), rank=rank, attempt=attempt,
                               main_thread=threading.main_thread().ident or 0,
                               host=socket.gethostname())
        fifo = request_path(watch_dir, rank)
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo)
        threading.Thread(target=_answer_requests, args=(str(fifo), record_path(watch_dir, rank)),
                         name="distrain-stacks", daemon=True).start()


_watched: list[_Watched] = []  # at most one entry; a forked child (DataLoader worker) ignores it


def _current() -> _Watched | None:
    if _watched and _watched[0].pid == os.getpid():
        return _watched[0]
    return None


def install() -> bool:
    """Start this worker's heartbeat and dump handlers when a distrain launcher watches it, and
    its own watch on that launcher (:mod:`distrain.orphans`).

    Idempotent; called at worker start by the launchers and again by ``distrain.init()``.
    """
    watch_launcher()
    if _current() is not None:
        return True
    watch_dir = os.environ.get(WATCH_DIR_ENV)
    if not watch_dir or not os.path.isdir(watch_dir) or "RANK" not in os.environ:
        return False
    try:
        rank = int(os.environ["RANK"])
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        watched = _Watched(watch_dir, rank, attempt)
    except (OSError, ValueError) as error:
        print(f"distrain: hang detection is off for this rank: {error}", file=sys.stderr)
        return False
    _watched[:] = [watched]
    return True


def progress(phase: str = "running") -> None:
    """Record one unit of progress (and what the rank does now)."""
    watched = _current()
    if watched is not None:
        watched.beat.update(phase=phase, now=time.time())


def finished() -> None:
    """This rank's training is over (``ddp.cleanup``): its exit may take a while without progress."""
    watched = _current()
    if watched is not None:
        watched.beat.update(phase="finished", now=time.time())


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the rank as inside ``name`` (a collective, data loading) until the block ends."""
    watched = _current()
    if watched is None:
        yield
        return
    watched.beat.update(phase=name, event=False, now=time.time())
    try:
        yield
    finally:
        watched.beat.update(phase="running", now=time.time())


def on_error(error: BaseException) -> None:
    """A rank's uncaught exception. When it is a collective timeout, the rank that never
    arrived is still alive: hold this rank's exit until the launcher has every rank's stacks."""
    watched = _current()
    if watched is None:
        return
    from distrain.results import is_collective_timeout

    if not is_collective_timeout(f"{type(error).__name__}: {error}"):
        return
    watched.beat.update(phase="collective timeout", now=time.time())
    collected = Path(watched.watch_dir) / COLLECTED.format(attempt=watched.attempt)
    deadline = time.monotonic() + COLLECTION_WAIT_S
    while not collected.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def watch_model(model: Any) -> None:
    """Record the forward and backward passes of ``model`` (a wrapped ``nn.Module``).

    A step ends when its backward pass has finished, including DDP's wait for the gradient
    all-reduce; its *own* time runs from the previous step's end to this backward's start (the
    first parameter gradient), so a slow rank shows as slow, not the ranks that wait for it. The
    hooks are registered once: nothing is added per step but two callbacks.
    """
    if _current() is None:
        return
    from torch.autograd.graph import register_multi_grad_hook

    model.register_forward_pre_hook(_before_forward)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if trained:
        register_multi_grad_hook(trained, _backward_started, mode="any")


def _before_forward(module: Any, inputs: Any) -> None:
    progress("forward")


def _backward_started(grad: Any) -> None:
    from torch.autograd import Variable

    watched = _current()
    if watched is None:
        return
    now = time.time()
    own = now - watched.backward_end if watched.backward_end else 0.0
    watched.beat.update(phase="backward", now=now, step_time=own if own > 0 else None,
                        step_started=now)
    # Callbacks run in order at the end of the pass; DDP queues its gradient wait after this
    # one, so re-queue once to land after it.
    engine = Variable._execution_engine  # type: ignore[attr-defined]
    engine.queue_callback(lambda: engine.queue_callback(_backward_finished))


def _backward_finished() -> None:
    watched = _current()
    if watched is not None:
        watched.backward_end = time.time()
        watched.beat.update(phase="running", step=True, now=watched.backward_end)


def _answer_requests(fifo: str, record: Path) -> None:
    """Write the Flight Recorder for each byte the launcher sends (best effort, GIL permitting)."""
    fd = os.open(fifo, os.O_RDWR)  # read-write: no EOF while the launcher has it closed
    while True:
        try:
            if not os.read(fd, 64):
                return
        except OSError:
            return
        text = _flight_record()
        temporary = record.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            temporary.write_text(text)
            os.replace(temporary, record)


def _flight_record() -> str:
    """torch's Flight Recorder as JSON (``{}`` when there is no process group or no recorder)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return "{}"
    try:
        import torch._C._distributed_c10d as c10d

        dumped = c10d._dump_fr_trace_json(includeCollectives=True)  # type: ignore[attr-defined]
        return dumped.decode() if isinstance(dumped, bytes) else str(dumped)
    except Exception as error:  # an older torch or no recorder: the stacks still tell
        return json.dumps({"error": str(error)})
