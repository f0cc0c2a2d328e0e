"""``Context``: where this worker stands, and the one :func:`distrain.init` recorded last.

A leaf module with no heavy imports, so every part of the library can name the type without
importing the process-group code (:mod:`distrain.group`) back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Context", "clear_current", "recorded", "set_current"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """Where this worker stands. ``backend`` is None when there is no process group.

    Used as a context manager (``with distrain.init() as ctx:``) it runs ``on_exit``
    (:func:`distrain.cleanup` for the contexts ``init`` makes) on exit, synchronising ranks
    unless an exception is on its way out.
    """

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    device: torch.device
    backend: str | None
    is_main: bool
    # What leaving ``with ctx:`` runs (distrain.init passes distrain.cleanup).
    on_exit: Callable[[bool], None] | None = field(default=None, repr=False, compare=False)

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def __enter__(self) -> Context:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.on_exit is not None:
            self.on_exit(exc_type is None)


class _Current:
    """Holds the context :func:`distrain.init` made last (one per process, like the process group)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Context | None = None


_current = _Current()


def set_current(ctx: Context) -> Context:
    _current.value = ctx
    return ctx


def clear_current() -> None:
    """Forget the context (the group it described is gone)."""
    _current.value = None


def recorded() -> Context | None:
    """The context :func:`distrain.init` recorded last, or None (none yet, or cleaned up)."""
    return _current.value
