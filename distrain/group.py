"""The process group's life in this worker: ``init``, the current context, ``cleanup``.

``init`` reads the environment contract (:mod:`distrain.env`) and so works the same under
``torchrun``, ``distrain launch`` (local or Ray) and with no launcher at all.

Clean exit: a DDP/FSDP wrapper keeps a reference to the process group. If it is still alive when
the interpreter finalizes, gloo's threads are torn down at a point where C++ calls
``std::terminate`` ("terminate called without an active exception", SIGABRT). ``cleanup`` (also
run by the context manager and at exit) first releases the wrappers :func:`track_wrapper` was
given, then synchronises ranks and destroys the group, so nothing is left for finalization.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import inspect
import logging
import os
import sys
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distrain import stacks
from distrain.affinity import pin_worker
from distrain.collectives import first_failure
from distrain.context import Context, clear_current, recorded, set_current
from distrain.env import WorkerEnv
from distrain.errors import CheckpointError, ConfigError

__all__ = [
    "BACKENDS",
    "InFlight",
    "cleanup",
    "current",
    "formed_group",
    "hold_until_cleanup",
    "init",
    "on_cleanup",
    "release_wrappers",
    "resolve",
    "resolve_backend",
    "resolve_device",
    "track_wrapper",
]

BACKENDS = ("auto", "gloo", "nccl", "mpi", "ucc", "xccl")


def resolve_backend(requested: str, *, cuda_available: bool) -> str:
    """``auto`` -> nccl when CUDA is usable, gloo otherwise; explicit names are checked."""
    name = requested.lower()
    if ":" in name:  # a per-device spec such as "cpu:gloo,cuda:nccl"
        return name
    if name not in BACKENDS:
        raise ConfigError("backend", requested, " | ".join(BACKENDS), 'use backend="auto"')
    if name == "auto":
        return "nccl" if cuda_available else "gloo"
    if name == "nccl" and not cuda_available:
        raise ConfigError(
            "backend", requested, "CUDA GPUs for nccl", 'use backend="gloo" (or "auto") on CPU'
        )
    return name


def resolve_device(local_rank: int, *, cuda_device_count: int) -> torch.device:
    """``cuda:LOCAL_RANK`` when this process sees GPUs, ``cpu`` otherwise.

    One visible GPU (``CUDA_VISIBLE_DEVICES`` narrowed per worker, as Ray does) is ``cuda:0``.
    """
    if cuda_device_count == 0:
        return torch.device("cpu")
    if cuda_device_count == 1:
        return torch.device("cuda", 0)
    if local_rank >= cuda_device_count:
        raise ConfigError(
            "LOCAL_RANK", local_rank, f"below the {cuda_device_count} visible GPUs",
            "launch at most one worker per GPU (--nproc-per-node gpu) or fix CUDA_VISIBLE_DEVICES",
        )
    return torch.device("cuda", local_rank)


def _timeout(value: float | timedelta | None) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        return value
    if value <= 0:
        raise ConfigError("timeout", value, "a positive number of seconds", "e.g. timeout=600")
    return timedelta(seconds=value)


def init(backend: str = "auto", timeout: float | timedelta | None = None) -> Context:
    """Join the process group the launcher prepared and pin this worker's device. Idempotent.

    A CPU worker under ``distrain launch`` is pinned to its share of the node's cores
    (``--cpu-affinity``, :mod:`distrain.affinity`).

    With no launcher (no ``RANK``/``WORLD_SIZE`` in the environment) this is a world of one and
    no process group is created. The context returned becomes the current one, which every
    other call uses when it is given no ``ctx``.

    Args:
        backend: ``"auto"`` (nccl with CUDA, else gloo), or a backend name such as ``"gloo"``.
        timeout: Seconds (or a ``timedelta``) a collective may take before it fails; torch's
            default when None.

    Returns:
        The :class:`~distrain.context.Context` of this worker (usable as ``with init() as ctx:``,
        which runs :func:`cleanup` at the end).

    Raises:
        ConfigError: An unknown backend, nccl without CUDA, a non-positive timeout, a
            ``LOCAL_RANK`` beyond the visible GPUs, or a launch without ``MASTER_ADDR``/``PORT``.
    """
    worker = WorkerEnv.from_environ()
    stacks.install()  # hang watch: heartbeat and stack dumps (no-op without distrain launch)
    cuda = torch.cuda.is_available()
    device = resolve_device(worker.local_rank, cuda_device_count=torch.cuda.device_count() if cuda else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif worker.launched:  # before the group starts its threads: they inherit the mask
        pin_worker(worker.local_rank, worker.local_world_size)
    if dist.is_available() and dist.is_initialized():
        return _context(worker, device, str(dist.get_backend()))
    name = resolve_backend(backend, cuda_available=cuda)
    collective_timeout = _timeout(timeout)
    if not worker.launched:
        return _context(worker, device, None)
    if not worker.master_addr or worker.master_port is None:
        raise ConfigError(
            "MASTER_ADDR/MASTER_PORT", worker.master_addr, "both set by the launcher",
            "start the script with distrain launch or torchrun (or export both)",
        )
    kwargs: dict[str, Any] = {"backend": name, "rank": worker.rank, "world_size": worker.world_size}
    if collective_timeout is not None:
        kwargs["timeout"] = collective_timeout
    kwargs["store"] = _attempt_store(worker, collective_timeout)
    if device.type == "cuda" and name == "nccl":
        kwargs["device_id"] = device
    own_hook = sys.excepthook
    dist.init_process_group(**kwargs)
    if _launcher_prefixes_lines():
        sys.excepthook = own_hook  # torch's hook adds "[rankN]: " to lines the launcher prefixes already
    _groups_formed.add(worker.world_size)
    atexit.register(_cleanup_at_exit)
    return _context(worker, device, name)


# World sizes of the groups init() formed in this process (read by the fast start's exit check).
_groups_formed: set[int] = set()


def formed_group() -> bool:
    """Whether :func:`init` ever formed a process group in this process."""
    return bool(_groups_formed)


def _launcher_prefixes_lines() -> bool:
    """stderr goes to elastic's per-rank log file (beside the error file), which the launcher
    echoes with a rank prefix (distrain always, torchrun with --tee/--redirects)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    try:
        target = os.readlink("/proc/self/fd/2")
    except OSError:
        return False
    return bool(error_file) and os.path.dirname(target) == os.path.dirname(str(error_file))


def _attempt_store(worker: WorkerEnv, timeout: timedelta | None) -> dist.Store:
    """torch's env:// store, with keys private to this restart attempt.

    A launcher may keep one store across restarts (torchrun shares its agent's); without a
    per-attempt prefix a restarted group reads the dead group's addresses and cannot connect.
    """
    extra = {} if timeout is None else {"timeout": timeout}
    store, _, _ = next(dist.rendezvous("env://", rank=worker.rank, world_size=worker.world_size, **extra))
    return dist.PrefixStore(f"distrain/attempt_{worker.restart_count}", store)


def _context(worker: WorkerEnv, device: torch.device, backend: str | None) -> Context:
    return set_current(Context(
        on_exit=_exit,
        rank=worker.rank,
        local_rank=worker.local_rank,
        world_size=worker.world_size,
        local_world_size=worker.local_world_size,
        node_rank=worker.node_rank,
        device=device,
        backend=backend,
        is_main=worker.rank == 0,
    ))


# Things to finish before the group goes away (TBLogger.flush, Checkpointer.wait). Weak, so a
# logger or checkpointer that was garbage collected is simply skipped.
_before_cleanup: list[weakref.WeakMethod[Callable[[], Any]]] = []


def exiting_on_error() -> bool:
    """True while an exception is on its way out (or the interpreter has reported one): this
    rank must not enter a collective its healthy peers may not be in."""
    return sys.exc_info()[0] is not None or hasattr(sys, "last_value")


def on_cleanup(method: Callable[[], Any]) -> None:
    """Call the bound ``method`` at :func:`cleanup`, before the process group is destroyed."""
    _before_cleanup.append(weakref.WeakMethod(method))


class InFlight:
    """A checkpoint save still running in the background, held by :func:`cleanup` until
    :meth:`release`: its owner (a Checkpointer) may be dropped first, its write may not."""

    __slots__ = ("finish",)

    def __init__(self, finish: Callable[[], None]) -> None:
        self.finish = finish  # joins the save on this rank; raises CheckpointError if it failed

    def release(self) -> None:
        """The save was joined and its outcome agreed on by every rank: cleanup need not."""
        with contextlib.suppress(ValueError):
            _in_flight.remove(self)


# Saves in flight (strong references, unlike _before_cleanup): cleanup() joins each one, then
# agrees on the outcome once over all of them, so every rank runs the same collectives however
# many Checkpointers it still has.
_in_flight: list[InFlight] = []


def hold_until_cleanup(finish: Callable[[], None]) -> InFlight:
    """Have :func:`cleanup` call ``finish`` (and raise its error on every rank) unless the
    returned hold is released first.

    Args:
        finish: Joins a background save on this rank; raises ``CheckpointError`` if it failed.
            It should not hold its owner (the hold would keep the owner alive until cleanup).

    Returns:
        The hold: :meth:`InFlight.release` it once the save's outcome was agreed elsewhere.
    """
    held = InFlight(finish)
    _in_flight.append(held)
    return held


def _finish_in_flight() -> list[str]:
    """Join every save in flight on this rank; the error message of each that failed."""
    held, _in_flight[:] = list(_in_flight), []
    failed = []
    for save in held:
        try:
            save.finish()
        except Exception as error:  # every save is joined before anything is reported
            failed.append(str(error) or repr(error))
    return failed


def _agreed_failure(failed: list[str], *, agree: bool) -> CheckpointError | None:
    """The error cleanup raises: this rank's own, or (agreeing: one all-gather, whatever this
    rank holds) the lowest failing peer's."""
    mine = "; ".join(failed) or None
    if agree:
        with contextlib.suppress(Exception):  # a peer gone: only this rank's own error is known
            found = first_failure(mine)
            if found is not None and mine is None:
                rank, text = found
                return CheckpointError(f"rank {rank} could not finish a checkpoint save before "
                                       f"cleanup: {text}")
    return None if mine is None else CheckpointError(mine)


FINAL_BARRIER_SECONDS = 60.0


def _cleanup_at_exit() -> None:
    """:func:`cleanup` for a script that never called it. Python only prints an exit handler's
    exception and exits 0, so an asynchronous save that failed would leave a run that looks
    successful: print the error, flush what the exit handlers still to run would flush, and
    leave with exit code 1."""
    try:
        cleanup()
    except CheckpointError as error:
        print(f"distrain: {type(error).__module__}.{type(error).__name__}: {error}", file=sys.stderr)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(1)


def cleanup(*, synchronize: bool | None = None) -> None:
    """Finish pending writes, release DDP/FSDP state, synchronise, destroy the group. Idempotent.

    Also runs at interpreter exit (where a failed save below makes the process exit 1, not the
    0 Python would give a failing exit handler). An asynchronous checkpoint save still in flight (its
    Checkpointer may be gone) is finished first; if it failed on any rank, every rank raises
    ``CheckpointError`` once the group is torn down. Errors of other pending work
    (``TBLogger.flush``) are printed, not raised.

    Args:
        synchronize: Wait for every rank before the group goes (default: unless an exception
            is on its way out). A failing rank must not enter a collective its healthy peers
            are not in, and a rank whose peers are gone must not hang: on gloo the wait is a
            ``monitored_barrier`` bounded by ``FINAL_BARRIER_SECONDS`` (by the group's timeout
            while a save was in flight: a peer may still be finishing its upload). Without it a
            save's error is printed, not raised, and only where it happened.

    Raises:
        CheckpointError: An asynchronous save in flight failed on some rank (raised on every
            rank that synchronized).
    """
    if synchronize is None:
        synchronize = not exiting_on_error()
    saving = bool(_in_flight)  # the same on every rank: each save holds one on every rank
    failed = _finish_in_flight()
    pending, _before_cleanup[:] = list(_before_cleanup), []
    for ref in pending:
        method = ref()
        if method is not None:
            try:
                method()
            except Exception as error:  # still tear down; the error is reported, not lost
                print(f"distrain: error while finishing before cleanup: {error!r}", file=sys.stderr)
    release_wrappers()
    gc.collect()
    clear_current()
    stacks.finished()  # the hang watch stops expecting progress from this rank
    grouped = dist.is_available() and dist.is_initialized()
    synchronized = False
    if grouped and synchronize:
        # A peer that already exited or failed leaves nothing to wait for.
        with contextlib.suppress(Exception):
            if dist.get_backend() == "gloo":
                bound = None if saving else timedelta(seconds=FINAL_BARRIER_SECONDS)
                dist.monitored_barrier(timeout=bound)
            else:
                dist.barrier()
            synchronized = True
    # One agreement per cleanup on every rank through the barrier: ranks hold the same saves,
    # but a rank whose Checkpointer is gone must take part all the same.
    failure = _agreed_failure(failed, agree=synchronized)
    stacks.finished()  # the agreement, a collective, marked this rank as running again
    if grouped:
        _unpin_default_group()
        dist.destroy_process_group()
        gc.collect()
    if failure is None:
        return
    if not synchronize:  # an exception is already on its way out: do not replace it
        print(f"distrain: {failure}", file=sys.stderr)
        return
    raise failure


def _exit(synchronize: bool) -> None:
    """What leaving ``with distrain.init() as ctx:`` does."""
    cleanup(synchronize=synchronize)


def current() -> Context:
    """The context of this process: the one ``distrain.init()`` returned, or ``init()`` now.

    ``init`` is idempotent, so calling it here (when a script passes no ``ctx`` and never called
    it) gives the same result the script would have got.

    Returns:
        The current :class:`~distrain.context.Context`.
    """
    found = recorded()
    return found if found is not None else init()


def resolve(ctx: Context | None) -> Context:
    """``ctx`` when given, else :func:`current`: every public call takes ``ctx=`` optionally."""
    return current() if ctx is None else ctx


def _release_fsdp_groups(root: nn.Module) -> None:
    """FSDP2 (``fully_shard``) holds its process groups in the mesh info of each parameter group
    and parameter, and in each device mesh's registry, which DTensor's sharding cache keeps
    alive: drop them, so that the group goes with ``destroy_process_group()``."""
    # Torch internals, read with getattr throughout: a renamed one must not break cleanup.
    for module in root.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        param_groups = getattr(get_state(), "_fsdp_param_groups", ()) if get_state is not None else ()
        for param_group in param_groups:
            for holder in (param_group, *getattr(param_group, "fsdp_params", ())):
                for name in ("mesh_info", "post_forward_mesh_info"):
                    _drop_groups(getattr(holder, name, None))


def _drop_groups(mesh_info: object) -> None:
    """Set an FSDP mesh info's process groups to None and empty its mesh's group registry."""
    if mesh_info is None:
        return
    for name, value in list(vars(mesh_info).items()):
        if isinstance(value, dist.ProcessGroup):
            setattr(mesh_info, name, None)
    registry = getattr(getattr(mesh_info, "mesh", None), "_pg_registry", None)
    if isinstance(registry, dict):
        registry.clear()


def _unpin_default_group() -> None:
    """Drop the references torch keeps to the default group in default arguments.

    ``torch.distributed.nn.functional`` declares its collectives with ``group=group.WORLD``,
    evaluated once, when the module is first imported. DDP's constructor imports it (through
    ``torch._dynamo``), so in a script the import comes after the group formed and those
    defaults hold the group until the interpreter exits: ``destroy_process_group()`` cannot free
    it, its gloo threads keep running into interpreter finalization, and one still finishing
    the last collective there needs the GIL and aborts the process (docs/troubleshooting.md). ``None``
    means the default group to every function in that module, as it did before it formed.
    """
    functional = sys.modules.get("torch.distributed.nn.functional")
    if functional is None or not dist.is_initialized():
        return
    default_group = dist.distributed_c10d._get_default_group()
    for value in vars(functional).values():
        defaults = getattr(value, "__defaults__", None)
        if inspect.isfunction(value) and defaults and any(d is default_group for d in defaults):
            value.__defaults__ = tuple(None if d is default_group else d for d in defaults)


# DDP wrappers made in this process (weak: a wrapper the user dropped is simply gone).
_live_wrappers: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def track_wrapper(wrapper: nn.Module) -> None:
    """Release ``wrapper``'s hold on the process group at :func:`cleanup`."""
    _live_wrappers.add(wrapper)


def release_wrappers() -> None:
    """Drop every reference a live DDP or FSDP wrapper holds to its process groups.

    Held past ``destroy_process_group()``, a group keeps its gloo threads running into
    interpreter finalization, which can abort the process (docs/troubleshooting.md). The DDP ``Reducer``
    (C++) owns the group and autograd hooks: deleting it here runs its destructor now, on the
    main thread, while the group still exists. The wrapper object the user holds stays valid as
    a container (``.module``) but can no longer run forward or backward.
    """
    for wrapper in list(_live_wrappers):
        if isinstance(wrapper, nn.parallel.DistributedDataParallel):
            for name in ("reducer", "logger", "_comm_hooks", "process_group", "_delay_all_reduce_params"):
                if name in wrapper.__dict__:
                    del wrapper.__dict__[name]
        else:
            _release_fsdp_groups(wrapper)
    _live_wrappers.clear()
    if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
        torch.cuda.synchronize()
