"""``Context``: where this worker stands, and the current one (set by :func:`distrain.init`).

A small module with no heavy imports, so every part of the library can name the type without
importing :mod:`distrain.ddp` back.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Context", "current", "resolve"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """Where this worker stands. ``backend`` is None when there is no process group.

    Used as a context manager (``with distrain.init() as ctx:``) it runs
    :func:`distrain.cleanup` on exit.
    """

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    device: torch.device
    backend: str | None
    is_main: bool

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
        from distrain.ddp import cleanup

        cleanup(synchronize=exc_type is None)


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


def current() -> Context:
    """The context of this process: the one ``distrain.init()`` returned, or ``init()`` now.

    ``init`` is idempotent, so calling it here (when a script passes no ``ctx`` and never called
    it) gives the same result the script would have got.
    """
    if _current.value is None:
        from distrain.ddp import init

        init()
    if _current.value is None:  # pragma: no cover - init always sets it
        raise RuntimeError("distrain.init() did not record a context")
    return _current.value


def resolve(ctx: Context | None) -> Context:
    """``ctx`` when given, else :func:`current`: every public call takes ``ctx=`` optionally."""
    return current() if ctx is None else ctx
