"""The interface between a checkpoint and its writers.

:class:`~distrain.ckpt.checkpointer.Checkpointer` writes full checkpoints itself and hands
sharded ones to :class:`~distrain.ckpt.sharded.ShardedSaver`. Both write the same manifest, RNG
file and JSON values through the one write job :meth:`CheckpointWriter.prepare` returns, so the
sharded backend needs only the calls below, never the Checkpointer's own members. A leaf module:
the backends name the type without importing the Checkpointer back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from distrain.ckpt.objstore import ObjectStore
    from distrain.ckpt.store import CheckpointError, CheckpointStore
    from distrain.context import Context

__all__ = ["CheckpointWriter"]


class CheckpointWriter(Protocol):
    """What a checkpoint backend may use of the checkpoint that owns it."""

    ctx: Context
    store: CheckpointStore | ObjectStore
    async_save: bool

    def prepare(
        self, step: int, objects: dict[str, Any], kinds: dict[str, str], rngs: list[Any], *,
        checkpoint_kind: str = "full", gathered: dict[str, Any] | None = None,
        elsewhere: dict[str, dict[str, str]] | None = None,
    ) -> Callable[..., None]:
        """Take the state now; return the job that writes and commits checkpoint ``step``."""
        ...

    def write_error(self, step: int, error: OSError) -> CheckpointError:
        """The one-line error for a failed write of ``step`` (what was kept, how to fix it)."""
        ...

    def gather_rng(self) -> list[Any]:
        """Every rank's RNG state, on rank 0 (a collective: every rank calls it)."""
        ...

    def finish_write(self) -> None:
        """Wait for rank 0's background write job, raising its error."""
        ...

    def submit_write(self, job: Callable[[], None]) -> None:
        """Run ``job`` on rank 0's background writer."""
        ...
