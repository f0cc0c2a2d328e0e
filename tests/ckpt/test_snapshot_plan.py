"""Which snapshot step the ranks resume from and where each rank's state comes from (pure)."""

from __future__ import annotations

from distrain.ckpt.buddy import buddy_of
from distrain.ckpt.snapshot_plan import Held, choose


def held(owner: int, step: int, ring: str, world: int = 2, index: int = 0) -> Held:
    return Held(owner=owner, step=step, world_size=world, ring=ring, index=index)


def test_buddy_is_the_same_local_rank_on_the_next_node_and_none_on_one_node() -> None:
    assert [buddy_of(r, 2, 4) for r in range(4)] == [2, 3, 0, 1]
    assert [buddy_of(r, 1, 3) for r in range(3)] == [1, 2, 0]
    assert buddy_of(0, 4, 4) is None and buddy_of(1, 2, 2) is None


def test_a_lost_node_is_restored_from_the_buddy_copies_on_the_other() -> None:
    """Node 0 (rank 0) holds its own ring and rank 1's copy; node 1 (rank 1) lost everything."""
    node0 = [held(0, 8, "rank-00000"), held(0, 9, "rank-00000", index=1),
             held(1, 7, "held-00001"), held(1, 8, "held-00001", index=1)]
    step, sources = choose([node0, []], exact=True) or (None, [])
    assert step == 8
    assert [(s.rank, s.holder, s.remote, s.slot.ring) for s in sources] == \
        [(0, 0, False, "rank-00000"), (1, 0, True, "held-00001")]


def test_own_node_first_then_the_lowest_holder_and_exact_needs_the_same_world() -> None:
    node = [held(0, 5, "rank-00000"), held(1, 5, "rank-00001")]
    step, sources = choose([node, node], exact=True) or (None, [])
    assert step == 5 and not any(s.remote for s in sources)
    assert choose([[held(0, 5, "rank-00000", world=4)], []], exact=True) is None
    assert choose([[held(0, 5, "rank-00000")], [held(1, 6, "rank-00001")]], exact=True) is None


def test_ddp_a_rank_with_no_state_anywhere_borrows_its_node_mates_but_never_a_newer_timeline() -> None:
    """The world grew (ranks 2, 3 are new): they borrow rank 0's state on their node (DDP only)."""
    node = [held(0, 4, "rank-00000"), held(1, 4, "rank-00001")]
    step, sources = choose([node, node, node, node], exact=False) or (None, [])
    assert step == 4 and [s.slot.owner for s in sources] == [0, 1, 0, 0]
    assert choose([node, node, node, node], exact=True) is None
    # Rank 1 has a state, just not of step 4 (and no copy of it anywhere): not step 4.
    assert choose([node[:1], [held(1, 3, "rank-00001")]], exact=False) is None


def test_an_excluded_step_falls_back_to_the_next_newest() -> None:
    both = [[held(0, 4, "rank-00000"), held(0, 5, "rank-00000", index=1)],
            [held(1, 4, "rank-00001"), held(1, 5, "rank-00001", index=1)]]
    assert (choose(both, exact=True) or (None,))[0] == 5
    assert (choose(both, exact=True, excluded=frozenset({5})) or (None,))[0] == 4
