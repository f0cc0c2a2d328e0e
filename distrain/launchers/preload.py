"""The fast start: script workers forked from a server that already imported torch.

``torchrun`` starts every worker as a fresh interpreter, so each one pays ``import torch``
(2-3 s of CPU) and N of them queue for the cores. Here one process, multiprocessing's
*forkserver*, imports ``torch`` (and ``--preload`` modules) once; each worker is ``fork()``-ed from
it and runs the script as ``__main__`` with ``runpy``. The workers are still started, watched,
restarted and stopped by ``torch.distributed.elastic`` (its function entrypoint with the
``forkserver`` start method): no process manager of our own.

The server must never initialise CUDA: a CUDA context does not survive ``fork()``. Importing
torch does not create one; each worker creates its own when it pins its device in
``distrain.ddp.init()`` (``torch.cuda.set_device(LOCAL_RANK)``) after the fork.

What a worker sees is what ``python -u script.py args`` would give it: ``sys.argv``,
``sys.path[0]`` (the script's directory, or the working directory for ``-m``),
``__name__ == "__main__"``, exit codes from ``sys.exit``, a traceback on stderr for an uncaught
exception, ``atexit`` handlers run at the end, and a free choice of
``multiprocessing.set_start_method``.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import runpy
import signal
import sys
import traceback
from collections.abc import Sequence

from distrain import stacks
from distrain.signals import SCHEDULER_STOP_SIGNALS, install

DEFAULT_PRELOAD = ("torch", "torch.distributed")


def start_server(preload: Sequence[str], script: str, *, module: bool, nproc: int) -> None:
    """Start the forkserver now (it imports torch, ``--preload`` and, with ``script`` or ``auto``
    when the ``nproc`` ranks outnumber the cores, the script's top-level imports) so it warms up
    while we set up."""
    from distrain.env import scoped_environ
    from distrain.launchers import preload_guard
    from distrain.launchers.preload_scan import resolve_preload, usable_cores

    named, found = resolve_preload(preload, script, module=module, nproc=nproc, cores=usable_cores())
    # Everything beyond torch goes through the guard: it tolerates any import error, loads what a
    # module names in DISTRAIN_PRELOAD (named and found modules alike), undoes import-time
    # environment changes, and freezes the server's objects for the gc before the forks.
    extra = [name for name in dict.fromkeys([*named, *found]) if name not in DEFAULT_PRELOAD]
    multiprocessing.set_forkserver_preload([*DEFAULT_PRELOAD, preload_guard.__name__])
    # Read (and removed) by the server's preload_guard; the workers must not inherit it.
    with scoped_environ({preload_guard.ENV: ",".join(extra)}):
        multiprocessing.forkserver.ensure_running()


def stop_server() -> None:
    """Stop this process's forkserver, if any: the next launch from the same process (the Python
    API) then starts its own, with its own preload list and environment."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    with contextlib.suppress(AttributeError, OSError):
        server._stop()  # type: ignore[union-attr]


def stop_resource_tracker() -> None:
    """Stop multiprocessing's resource tracker (the forkserver starts one) and reap it.

    For a process about to exit (the ``distrain launch`` command): the tracker only notices its
    parent is gone after the exit and would outlive the command for that moment. A Python caller
    of ``launch`` keeps its tracker: it is that process's own.
    """
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    with contextlib.suppress(AttributeError, OSError):
        tracker._stop()  # type: ignore[union-attr]


def run_script(script: str, args: Sequence[str], module: bool) -> None:
    """Run ``script`` (or ``-m`` module) as ``__main__`` in this forked worker, like ``python -u``."""
    own_session()
    # A forked worker inherits the "forkserver" start method; a script may choose its own.
    multiprocessing.context._default_context._actual_context = None  # type: ignore[attr-defined]
    install(SCHEDULER_STOP_SIGNALS, signal.SIG_DFL)  # the server ignores them (preload_guard)
    sys.argv = [script, *args]
    if module:
        sys.path[0:1] = [os.getcwd()]
    else:
        sys.path[0:1] = [os.path.dirname(os.path.abspath(script))]
    stop_signals = _watch_signals()
    stacks.install()  # heartbeat and dump handlers before the script's first line
    try:
        if module:
            namespace = runpy.run_module(script, run_name="__main__", alter_sys=True)
        else:
            namespace = runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_request:
        _finish()
        code = _exit_code(exit_request.code)
        if code == 0:  # elastic turns exit 0 into a return, which waits for the agent (see below)
            _leave_if_stopped(stop_signals)
        raise SystemExit(code) from None
    except BaseException as error:
        stacks.on_error(error)  # a collective timeout: the launcher names who never arrived
        _print_traceback(error)
        _finish()
        raise
    # The script's globals stay reachable until the exit handlers ran, as under ``python script.py``.
    # Once runpy returns, its namespace is cyclic garbage (functions -> globals), and a live
    # DataLoader iterator in it (persistent workers, ``next(iter(loader))``) would be collected by
    # ``ddp.cleanup()``'s gc.collect(): the gc runs the iterator's queues' weakref finalizers first
    # (they stop the queue feeder threads), then its ``__del__``, whose shutdown message to the
    # workers is never sent, so it waits 5 s per worker (torch's MP_STATUS_CHECK_INTERVAL) before
    # killing them. Kept alive, the workers are stopped by multiprocessing's exit handler instead.
    _warn_if_never_grouped()
    _finish()
    del namespace
    _leave_if_stopped(stop_signals)


def own_session() -> None:
    """Make this worker the leader of its own session, as elastic makes a spawned worker
    (``Popen(start_new_session=True)``).

    With the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on by
    default) every session is one scheduling group with one group's share of the CPU. Forked
    workers stayed in the launcher's session: all ranks and the launcher shared one share, so
    whenever anything else ran (the launcher's log tailing, another job) they got less CPU than
    spawned workers, each in a group of its own (docs/performance.md).
    """
    with contextlib.suppress(OSError):  # already a session or group leader: nothing to do
        os.setsid()


def _warn_if_never_grouped() -> None:
    """One line (from rank 0) when a multi-rank script ended without ever joining a process group:
    every rank then trained alone on all the data and wrote the same files."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 or os.environ.get("RANK") != "0":
        return
    from torch.distributed import distributed_c10d

    from distrain.group import formed_group

    # torch sets its init method on every successful init_process_group without a store and never
    # resets it; ddp.init (which passes a store) records its own groups.
    plain = getattr(distributed_c10d, "_default_pg_init_method", None) is not None
    if not (plain or formed_group() or distributed_c10d.is_initialized()):
        print(f"distrain: warning: the {world} ranks never formed a process group (no ddp.init() or "
              "init_process_group): each trained alone on all the data; call ddp.init() first, or "
              "launch with --nproc-per-node 1", file=sys.stderr, flush=True)


def _watch_signals() -> int:
    """A pipe Python writes the number of every handled signal to (``signal.set_wakeup_fd``)."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    # Processes the script forks (DataLoader workers) must not report their signals as ours.
    os.register_at_fork(after_in_child=_forget_wakeup_fd)
    return read_end


def _forget_wakeup_fd() -> None:
    with contextlib.suppress(ValueError):  # forked from a thread other than the main one
        signal.set_wakeup_fd(-1)


def _leave_if_stopped(read_end: int) -> None:
    """Exit now (128 + signal) if the script handled SIGTERM/SIGINT and then returned normally
    (or called ``sys.exit(0)``, which torch's ``record`` wrapper turns into a return).

    The launcher sends SIGTERM only when it stops the group (a preemption, a failed peer). Its
    agent then waits for the workers to exit, while a function-entrypoint worker that returns
    waits for the agent to collect its return value: a script that saves a checkpoint on
    SIGTERM and returns would sit there until ``--term-timeout`` ran out and be SIGKILLed.
    """
    try:
        received = os.read(read_end, 4096)
    except (BlockingIOError, OSError):
        received = b""
    for signum in (signal.SIGTERM, signal.SIGINT):
        if bytes([signum]) in received:
            os._exit(128 + signum)


def _print_traceback(error: BaseException) -> None:
    """What the interpreter prints for an uncaught exception, without our runpy frames."""
    tb = error.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>")):
        tb = tb.tb_next
    traceback.print_exception(type(error), error, tb)


def _exit_code(code: object) -> int:
    """``sys.exit``'s rules: None -> 0, an int -> itself, anything else printed -> 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _finish() -> None:
    """Interpreter exit, minus finalization: atexit handlers, then flushed streams."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
