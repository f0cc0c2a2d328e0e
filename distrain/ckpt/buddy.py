"""Buddy copies: each rank's snapshot also kept in the memory of a rank on another node.

The buddy of rank ``r`` is rank ``(r + local_world_size) % world_size``: the same local rank on
the next node. On one node there is none and nothing is sent. After each snapshot is committed,
a thread of its own sends it to the buddy and receives the snapshot of rank
``(r - local_world_size) % world_size`` into a ring of three slots held for that rank
(``held-<rank>/`` in the node's snapshot directory), over a gloo group of its own (``new_group``),
so these transfers never interleave with the training's collectives and never hold a step.

Every rank runs one exchange round per snapshot, in order, so each send meets its receive. A
round starts with a one-number all-reduce on the group: when any rank took a newer snapshot
while the previous round was still sending, every rank skips this one (a slow link skips
snapshots instead of queueing them), so every rank sends, or none does. Each rank keeps its
own snapshots of the two newest rounds that went everywhere (``pinned``: its ring does not
overwrite them): a round starts on a rank only once every rank has finished the one before,
so when a node is lost every survivor still holds its own state of a step whose copies of the
lost ranks' states the buddies hold. The held slot's meta file (the sender's, with
the digest of its data) is written only after the data arrived, by an atomic rename, so a held
slot is complete or absent; one whose data changed in flight fails its digest at load and is
not used.

:func:`fetch` sends whole slots at load (a rank whose node lost its own snapshot takes it from
the rank holding the copy).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from distrain.affinity import unpin_this_thread
from distrain.ckpt.snapshot_files import Slot, SlotMeta, pick

if TYPE_CHECKING:
    from distrain.context import Context

HELD = "held-"  # a ring held for another rank: held-<that rank>


def buddy_of(rank: int, local_world_size: int, world_size: int) -> int | None:
    """The rank that keeps ``rank``'s copy, or None when all ranks share one node."""
    if world_size <= local_world_size or local_world_size < 1:
        return None
    return (rank + local_world_size) % world_size


class BuddyLink:
    """This rank's exchange of snapshots with its buddy (sends) and its source (receives)."""

    def __init__(self, ctx: Context, node_dir: Path, slots: int) -> None:
        self.ctx = ctx
        self.buddy = buddy_of(ctx.rank, ctx.local_world_size, ctx.world_size)
        self.source = (ctx.rank - ctx.local_world_size) % ctx.world_size
        self.dir = node_dir / f"{HELD}{self.source:05d}"
        self.held = [Slot(self.dir, i) for i in range(slots)]
        self.sent = self.skipped = 0
        # The steps of the two newest rounds whose copies went everywhere: after a node is lost,
        # every survivor still holds its own snapshot of one of them (see _round)
        self.pinned: tuple[int | None, int | None] = (None, None)
        self._group: Any = None
        self._jobs: queue.SimpleQueue[tuple[Slot | None, torch.Tensor | None, int] | None] = \
            queue.SimpleQueue()
        self._latest = -1
        self._pending = 0
        self._done = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def enabled(self) -> bool:
        return self.buddy is not None and self.ctx.distributed

    def start(self) -> None:
        """Make the group (a collective: every rank, at its first snapshot) and the thread."""
        if not self.enabled or self._group is not None:
            return
        self._group = dist.new_group(backend="gloo")
        self._thread = threading.Thread(target=self._serve, name="distrain-buddy", daemon=True)
        self._thread.start()

    def offer(self, slot: Slot | None, data: torch.Tensor | None, step: int) -> None:
        """Queue the round of snapshot ``step`` (``slot`` None: it failed; only the header goes)."""
        if self._group is None:
            return
        with self._done:
            self._latest = step
            self._pending += 1
        self._jobs.put((slot, data, step))

    def _serve(self) -> None:
        unpin_this_thread()  # any core of the node, not only this rank's (distrain.affinity)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._round(*job)
            except BaseException as error:  # raised by wait(), in the training thread
                self._error = self._error or error
            finally:
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()

    def _round(self, slot: Slot | None, data: torch.Tensor | None, step: int) -> None:
        raw = b""
        if slot is not None and data is not None and self._latest == step and self._error is None:
            raw = slot.committed_json() or b""  # b"": being rewritten, skip the round
        # Every rank sends, or none does: the rounds whose copies went everywhere are then the
        # same on every rank, and each rank keeps its own snapshot of the newest two (pinned).
        agreed = torch.tensor([1 if raw else 0])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self._group)
        if not agreed.item() or data is None:
            self.skipped += 1
            return
        buddy = self.buddy if self.buddy is not None else self.ctx.rank  # rounds run only with one
        mine = torch.tensor([len(raw), data.numel()])
        theirs = torch.zeros(2, dtype=torch.int64)
        _exchange([(mine, buddy)], [(theirs, self.source)], self._group)
        meta_len, size = (int(v) for v in theirs.tolist())
        self.dir.mkdir(parents=True, exist_ok=True)
        target = pick(self.held)
        target.invalidate()
        meta_buffer = torch.empty(meta_len, dtype=torch.uint8)
        _exchange([(torch.frombuffer(bytearray(raw), dtype=torch.uint8), buddy), (data, buddy)],
                  [(meta_buffer, self.source), (target.allocate(size), self.source)], self._group)
        target.commit_raw(meta_buffer.numpy().tobytes())
        self.sent += 1
        self.pinned = (step, self.pinned[0])  # a new tuple: read by the training thread

    def wait(self) -> None:
        """Until every queued round is done; raise a round's error, if any."""
        with self._done:
            self._done.wait_for(lambda: self._pending == 0)
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self, *, join: bool = True) -> None:
        """Stop the thread (``join``: wait until it has; a daemon is left to the exit otherwise)."""
        if self._thread is not None:
            self._jobs.put(None)
            if join:
                self._thread.join()
            self._thread = None


def _exchange(sends: Sequence[tuple[torch.Tensor, int]], receives: Sequence[tuple[torch.Tensor, int]],
              group: Any) -> None:
    """Post every send and receive at once (a ring: everyone sends and receives), then wait."""
    works = [dist.isend(t, dst=peer, group=group) for t, peer in sends]
    works += [dist.irecv(t, src=peer, group=group) for t, peer in receives]
    for work in works:
        cast(Any, work).wait()


def fetch(ctx: Context,
          transfers: Sequence[tuple[int, int, Slot | None]]) -> tuple[SlotMeta, torch.Tensor] | None:
    """Send whole slots between ranks at load, in the order given (the same on every rank).

    ``transfers``: (sender, receiver, the sender's slot or None on other ranks). Returns the
    slot this rank received, or None."""
    got = None
    for sender, receiver, slot in transfers:
        if ctx.rank == sender and slot is not None:
            raw = slot.committed_json() or b""  # agreed complete: not rewritten while loading
            meta = SlotMeta.from_bytes(raw)
            data = slot.mapped(meta.size)
            head = torch.tensor([len(raw), meta.size])
            dist.send(head, dst=receiver)
            dist.send(torch.frombuffer(bytearray(raw), dtype=torch.uint8), dst=receiver)
            dist.send(data, dst=receiver)
        elif ctx.rank == receiver:
            head = torch.zeros(2, dtype=torch.int64)
            dist.recv(head, src=sender)
            raw_buffer = torch.empty(int(head[0]), dtype=torch.uint8)
            dist.recv(raw_buffer, src=sender)
            data = torch.empty(int(head[1]), dtype=torch.uint8)
            dist.recv(data, src=sender)
            got = (SlotMeta.from_bytes(raw_buffer.numpy().tobytes()), data)
    return got
