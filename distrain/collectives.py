"""Small collectives every part of distrain uses: mean, max, agreement, broadcast, print0, barrier.

Each is the identity (or a plain local answer) without a process group, so the same code runs
in a world of one. Values travel as float64 tensors (on the current CUDA device under NCCL) or,
for arbitrary picklable values, through ``*_object`` collectives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from distrain import stacks

__all__ = ["all_reduce_mean", "barrier", "broadcast", "first_failure", "mean", "print0", "reduce_max"]

T = TypeVar("T")


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def _reduce(tensor: torch.Tensor, op: Any) -> torch.Tensor:
    """``tensor`` reduced with ``op`` over ranks, on the device it came from."""
    moved = tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    with stacks.phase("collective"):
        dist.all_reduce(moved, op=op)
    return moved.to(tensor.device)


def mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (a new tensor; ``tensor`` itself may be reduced in place).

    Args:
        tensor: The same shape on every rank.

    Returns:
        The element-wise mean, on ``tensor``'s device.
    """
    if not _grouped():
        return tensor
    return _reduce(tensor, dist.ReduceOp.SUM) / dist.get_world_size()


def all_reduce_mean(value: T) -> T:
    """Mean over ranks of a tensor, a number, or a dict of numbers/tensors.

    Args:
        value: A tensor, an int/float, or a mapping of names to numbers or one-element tensors.
            Every rank passes the same kind (and the same keys).

    Returns:
        The mean in the same form (numbers become floats); ``value`` itself without a group.

    Raises:
        TypeError: ``value`` is none of these.
    """
    if not _grouped():
        return value
    if isinstance(value, Mapping):
        keys = list(value)
        stacked = torch.tensor([float(value[k]) for k in keys], dtype=torch.float64)
        reduced = mean(stacked)
        return {k: float(v) for k, v in zip(keys, reduced.tolist())}  # type: ignore[return-value]
    if isinstance(value, torch.Tensor):
        return mean(value.detach().clone())  # type: ignore[return-value]
    if isinstance(value, (int, float)):
        return float(mean(torch.tensor([float(value)], dtype=torch.float64)).item())  # type: ignore[return-value]
    raise TypeError(f"all_reduce_mean takes a tensor, number or dict, not {type(value).__name__}")


def reduce_max(values: Mapping[str, float]) -> dict[str, float]:
    """The largest value over ranks for each key.

    Args:
        values: Names to numbers; every rank passes the same keys.

    Returns:
        Names to the maximum over ranks (the values as floats without a group).
    """
    keys = list(values)
    if not keys or not _grouped():
        return {key: float(values[key]) for key in keys}
    tensor = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64)
    reduced = _reduce(tensor, dist.ReduceOp.MAX)
    return {key: float(value) for key, value in zip(keys, reduced.tolist())}


def first_failure(message: str | None) -> tuple[int, str] | None:
    """Agree on failure: every rank passes its error message (None when it is fine).

    One all-gather, so every rank learns the same answer whichever rank failed.

    Args:
        message: This rank's error message, or None.

    Returns:
        ``(rank, message)`` of the lowest rank that failed, or None when none did.
    """
    messages: list[Any] = [message]
    if _grouped():
        messages = [None] * dist.get_world_size()
        with stacks.phase("collective"):
            dist.all_gather_object(messages, message)
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    return failed[0] if failed else None


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (a small picklable object).

    Args:
        value: What rank 0 sends; other ranks' values are ignored.

    Returns:
        Rank 0's value (``value`` itself without a group).
    """
    if not _grouped():
        return value
    box = [value]
    with stacks.phase("collective"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing without a group)."""
    if _grouped():
        with stacks.phase("collective"):
            dist.barrier()


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on global rank 0 only (flushed).

    Args:
        *args: What ``print`` takes.
        **kwargs: ``print``'s keyword arguments (``flush`` is always on).
    """
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)
