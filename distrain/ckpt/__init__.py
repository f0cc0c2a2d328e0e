"""Checkpoints: rank 0 writes the full state atomically and verified, every rank resumes exactly.

See :class:`Checkpointer` and ``distrain ckpt --help`` (``ls``, ``inspect``, ``verify``, ``export``).
``Checkpointer`` is imported on first use, so ``distrain ckpt ls/verify`` start without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distrain.ckpt.store import (
    CheckpointError,
    CheckpointStore,
    CheckpointWarning,
    UnsafeCheckpointError,
    verify,
)

if TYPE_CHECKING:
    from distrain.ckpt.checkpointer import Checkpointer

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "CheckpointWarning",
    "Checkpointer",
    "UnsafeCheckpointError",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name == "Checkpointer":
        from distrain.ckpt.checkpointer import Checkpointer

        return Checkpointer
    raise AttributeError(f"module 'distrain.ckpt' has no attribute {name!r}")
