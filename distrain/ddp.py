"""The worker side: process group, device pinning, model wrapping, collectives, clean exit.

Five calls make a distributed training script (see README "Your training script")::

    ctx = ddp.init()                       # process group + device; a world of one without a launcher
    model = ddp.wrap(model, ctx)           # DDP | DataParallel | FSDP | plain
    loader = data.build_loader(ds, ctx, batch_size=64)
    ...
    ddp.cleanup()                          # or: with ddp.init() as ctx: ...

``init`` reads the environment contract (:mod:`distrain.env`) and so works the same under
``torchrun``, ``distrain launch`` (local or Ray) and with no launcher at all.

Clean exit: a DDP/FSDP wrapper keeps a reference to the process group. If it is still alive when
the interpreter finalizes, gloo's threads are torn down at a point where C++ calls
``std::terminate`` ("terminate called without an active exception", SIGABRT). ``cleanup`` (also
run by the context manager and at exit) first releases what :func:`wrap` created, then
synchronises ranks and destroys the group, so nothing is left for finalization.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import sys
import weakref
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from distrain import stacks
from distrain.amp import accumulate, autocast, grad_scaler
from distrain.context import Context, clear_current, set_current
from distrain.env import WorkerEnv
from distrain.errors import ConfigError
from distrain.fsdp import clip_grad_norm
from distrain.wrapping import choose_strategy, release_wrapper, unwrap, wrap

__all__ = [
    "Context",
    "accumulate",
    "all_reduce_mean",
    "autocast",
    "barrier",
    "choose_strategy",
    "cleanup",
    "clip_grad_norm",
    "grad_scaler",
    "init",
    "on_cleanup",
    "print0",
    "resolve_backend",
    "resolve_device",
    "unwrap",
    "wrap",
]

log = logging.getLogger("distrain")
BACKENDS = ("auto", "gloo", "nccl", "mpi", "ucc", "xccl")
T = TypeVar("T")


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

    With no launcher (no ``RANK``/``WORLD_SIZE`` in the environment) this is a world of one and
    no process group is created.
    """
    worker = WorkerEnv.from_environ()
    stacks.install()  # hang watch: heartbeat and stack dumps (no-op without distrain launch)
    cuda = torch.cuda.is_available()
    device = resolve_device(worker.local_rank, cuda_device_count=torch.cuda.device_count() if cuda else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
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
    atexit.register(cleanup)
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


def on_cleanup(method: Callable[[], Any]) -> None:
    """Call the bound ``method`` at :func:`cleanup`, before the process group is destroyed."""
    _before_cleanup.append(weakref.WeakMethod(method))


FINAL_BARRIER_SECONDS = 60.0


def cleanup(*, synchronize: bool | None = None) -> None:
    """Finish pending writes, release DDP/FSDP state, synchronise, destroy the group. Idempotent.

    ``synchronize`` (default: unless an exception is on its way out) waits for every rank before
    the group goes. A failing rank must not enter a collective its healthy peers are not in, and
    a rank whose peers are gone must not hang: on gloo the wait is a ``monitored_barrier`` bounded
    by ``FINAL_BARRIER_SECONDS``.
    """
    if synchronize is None:
        synchronize = sys.exc_info()[0] is None and not hasattr(sys, "last_value")
    pending, _before_cleanup[:] = list(_before_cleanup), []
    for ref in pending:
        method = ref()
        if method is not None:
            try:
                method()
            except Exception as error:  # still tear down; the error is reported, not lost
                print(f"distrain: error while finishing before cleanup: {error!r}", file=sys.stderr)
    release_wrapper()
    gc.collect()
    clear_current()
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize:
        # A peer that already exited or failed leaves nothing to wait for.
        with contextlib.suppress(Exception):
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=FINAL_BARRIER_SECONDS))
            else:
                dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        with stacks.phase("collective"):
            dist.barrier()


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on global rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(value: T) -> T:
    """Mean over ranks of a tensor, a float, or a dict of floats/tensors; identity when alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    if isinstance(value, Mapping):
        keys = list(value)
        stacked = torch.tensor([float(value[k]) for k in keys], dtype=torch.float64)
        reduced = _mean(stacked)
        return {k: float(v) for k, v in zip(keys, reduced.tolist())}  # type: ignore[return-value]
    if isinstance(value, torch.Tensor):
        return _mean(value.detach().clone())  # type: ignore[return-value]
    if isinstance(value, (int, float)):
        return float(_mean(torch.tensor([float(value)], dtype=torch.float64)).item())  # type: ignore[return-value]
    raise TypeError(f"all_reduce_mean takes a tensor, number or dict, not {type(value).__name__}")


def _mean(tensor: torch.Tensor) -> torch.Tensor:
    backend = dist.get_backend()
    moved = tensor
    if backend == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    with stacks.phase("collective"):
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return (moved / dist.get_world_size()).to(tensor.device)
