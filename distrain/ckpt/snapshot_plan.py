"""Which snapshot step the ranks resume from, and where each rank's state comes from (pure).

Every rank lists the complete slots it can read on its node (:class:`Held`: its own ring, its
node-mates' rings, and the rings it holds for a buddy on another node); the lists of all ranks
are gathered, and :func:`choose` picks, identically on every rank, the newest step that every rank
of this world can restore, with a :class:`Source` per rank:

1. the rank's own state, on its node (any ring there: after a restart the rank may be another);
2. else its own state held by a rank on another node (the buddy copy), sent at load;
3. else, only when ``exact`` is False (DDP: every rank holds the same model and optimizer) and no
   state of that rank exists anywhere (the world grew), the lowest rank's state on its node,
   with a derived RNG seed.

``exact`` (FSDP: each rank holds a different shard) also asks for the snapshot's world size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Held:
    """A complete slot a rank can read: the state of rank ``owner`` at ``step``."""

    owner: int
    step: int
    world_size: int
    ring: str  # the ring's directory name in the node's snapshot directory
    index: int  # the slot in the ring


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """Where rank ``rank`` gets its state for the chosen step: from rank ``holder``'s node."""

    rank: int
    holder: int  # the rank that reads the slot (``rank`` itself, or the one that sends it)
    slot: Held

    @property
    def remote(self) -> bool:
        return self.holder != self.rank


def _own(held: Sequence[Held], rank: int, step: int, world: int, exact: bool) -> Held | None:
    found = [h for h in held if h.owner == rank and h.step == step and (not exact or h.world_size == world)]
    return min(found, key=lambda h: (h.ring, h.index)) if found else None


def sources_at(inventories: Sequence[Sequence[Held]], step: int, *, exact: bool) -> list[Source] | None:
    """Every rank's source for ``step``, or None when some rank has none."""
    world = len(inventories)
    owners = {h.owner for held in inventories for h in held}
    sources = []
    for rank in range(world):
        slot = _own(inventories[rank], rank, step, world, exact)
        if slot is not None:
            sources.append(Source(rank=rank, holder=rank, slot=slot))
            continue
        remote = next(((q, s) for q in range(world)
                       if (s := _own(inventories[q], rank, step, world, exact)) is not None), None)
        if remote is not None:
            sources.append(Source(rank=rank, holder=remote[0], slot=remote[1]))
            continue
        if exact or rank in owners:  # a state of this rank exists, not of this step: not this step
            return None
        borrowed = sorted((h for h in inventories[rank] if h.step == step), key=lambda h: (h.owner, h.ring))
        if not borrowed:
            return None
        sources.append(Source(rank=rank, holder=rank, slot=borrowed[0]))
    return sources


def choose(inventories: Sequence[Sequence[Held]], *, exact: bool,
           excluded: frozenset[int] = frozenset()) -> tuple[int, list[Source]] | None:
    """The newest step (not in ``excluded``) every rank can restore, and every rank's source."""
    steps = sorted({h.step for held in inventories for h in held} - excluded, reverse=True)
    for step in steps:
        sources = sources_at(inventories, step, exact=exact)
        if sources is not None:
            return step, sources
    return None
