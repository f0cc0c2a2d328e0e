"""ResumableDistributedSampler: DistributedSampler parity, exact mid-epoch resume, any world size."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler, TensorDataset

from distrain.data import ResumableDistributedSampler, build_loader
from distrain.data.sampler import global_order
from distrain.ddp import Context
from distrain.errors import ConfigError


def _ctx(rank: int = 0, world_size: int = 1) -> Context:
    return Context(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                   node_rank=0, device=torch.device("cpu"), backend=None, is_main=rank == 0)


def _samplers(length: int, world: int, **kw: object) -> list[ResumableDistributedSampler]:
    return [ResumableDistributedSampler(range(length), world, r, **kw) for r in range(world)]  # type: ignore[arg-type]


def _take(samplers: list[ResumableDistributedSampler], batches: int, batch: int) -> list[int]:
    """Each rank hands ``batches`` batches to the loop; returns what they consumed in global order."""
    streams = [iter(s) for s in samplers]
    taken: list[list[int]] = [[] for _ in samplers]
    for _ in range(batches):
        for rank, (sampler, stream) in enumerate(zip(samplers, streams)):
            got = [next(stream) for _ in range(batch)]
            taken[rank] += got
            sampler.record_consumed(len(got))
    return [taken[r][i] for i in range(len(taken[0])) for r in range(len(samplers))]


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 80), world=st.integers(1, 5), seed=st.integers(0, 3),
       epoch=st.integers(0, 3), shuffle=st.booleans(), drop_last=st.booleans())
def test_identical_to_distributed_sampler(length: int, world: int, seed: int, epoch: int,
                                          shuffle: bool, drop_last: bool) -> None:
    for rank in range(world):
        ours = ResumableDistributedSampler(range(length), world, rank, shuffle=shuffle, seed=seed,  # type: ignore[arg-type]
                                           drop_last=drop_last)
        theirs = DistributedSampler(range(length), world, rank, shuffle=shuffle, seed=seed,  # type: ignore[arg-type]
                                    drop_last=drop_last)
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        assert list(ours) == list(theirs)
        assert len(ours) == len(theirs)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(4, 90), world=st.integers(1, 4), seed=st.integers(0, 5))
def test_ranks_are_disjoint_and_cover_the_dataset(length: int, world: int, seed: int) -> None:
    per_rank = [list(s) for s in _samplers(length, world, seed=seed)]
    everything = [i for indices in per_rank for i in indices]
    assert set(everything) == set(range(length))
    padding = -length % world
    assert len(everything) == length + padding
    assert sum(count - 1 for count in Counter(everything).values()) == padding


@settings(max_examples=120, deadline=None)
@given(
    length=st.integers(8, 120), old_world=st.integers(1, 4), new_world=st.integers(1, 4),
    batch=st.integers(1, 5), seed=st.integers(0, 9), epoch=st.integers(0, 2), data=st.data(),
)
def test_resume_on_any_world_size_continues_with_exactly_the_unseen_samples(
    length: int, old_world: int, new_world: int, batch: int, seed: int, epoch: int, data: st.DataObject
) -> None:
    before = _samplers(length, old_world, seed=seed)
    for sampler in before:
        sampler.set_epoch(epoch)
    max_batches = (length // old_world) // batch
    batches = data.draw(st.integers(0, max(0, max_batches - 1)), label="batches before the stop")
    seen = _take(before, batches, batch)
    state = before[0].state_dict()
    assert all(s.state_dict() == state for s in before)  # every rank agrees on the resume point
    assert state["consumed"] == len(seen)

    after = _samplers(length, new_world, seed=seed)
    for sampler in after:
        sampler.load_state_dict(state)
        sampler.set_epoch(epoch)  # the loop's usual call keeps the resume point of the same epoch
    interleaved = [list(s) for s in after]
    rest = [i for indices in interleaved for i in indices]
    order = global_order(length, epoch=epoch, seed=seed, shuffle=True)
    assert seen == order[: len(seen)]  # a prefix of the epoch's global order
    assert set(rest) == set(order[len(seen):])  # exactly the unseen samples ...
    assert not set(rest) & set(seen)  # ... none repeated
    assert len(rest) - len(set(rest)) == -(length - len(seen)) % new_world  # only padding repeats
    # and dealt out in the same global order as an uninterrupted run would continue it
    merged = [interleaved[r][i] for i in range(len(interleaved[0])) for r in range(new_world)]
    assert merged[: length - len(seen)] == order[len(seen):]


def test_finished_epoch_resumes_at_the_next_one() -> None:
    sampler = ResumableDistributedSampler(range(10), 2, 0, seed=1)  # type: ignore[arg-type]
    sampler.set_epoch(4)
    list(sampler)
    sampler.record_consumed(5)
    state = sampler.state_dict()
    fresh = ResumableDistributedSampler(range(10), 2, 0, seed=1)  # type: ignore[arg-type]
    fresh.load_state_dict(state)
    assert fresh.epoch == 5 and fresh.consumed == 0


def test_state_from_another_dataset_or_seed_is_refused() -> None:
    state = ResumableDistributedSampler(range(10), 1, 0, seed=1).state_dict()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dataset_length"):
        ResumableDistributedSampler(range(11), 1, 0, seed=1).load_state_dict(state)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed"):
        ResumableDistributedSampler(range(10), 1, 0, seed=2).load_state_dict(state)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_loader_counts_consumed_batches_not_prefetched_ones() -> None:
    dataset = TensorDataset(torch.arange(40).float())
    loader = build_loader(dataset, _ctx(0, 2), batch_size=3, num_workers=2, seed=3)
    loader.set_epoch(0)
    stream = iter(loader)
    first = [next(stream)[0] for _ in range(2)]  # workers have prefetched more than this
    state = loader.state_dict()
    assert state["sampler"]["consumed"] == 2 * 3 * 2
    del stream
    resumed = build_loader(dataset, _ctx(0, 2), batch_size=3, num_workers=0, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    rest = [b[0] for b in resumed]
    mine = [int(i) for i in ResumableDistributedSampler(range(40), 2, 0, seed=3)]  # type: ignore[arg-type]
    got = [int(v) for batch in first + rest for v in batch]
    assert got == mine  # rank 0's stream, split across the stop, is its uninterrupted stream
    assert len(resumed) == len(rest)


def test_loader_batch_arguments_are_checked() -> None:
    dataset = TensorDataset(torch.arange(8).float())
    with pytest.raises(ConfigError, match="global_batch_size=5"):
        build_loader(dataset, _ctx(0, 2), global_batch_size=5)
    with pytest.raises(ConfigError, match="at least one"):
        build_loader(dataset, _ctx())
    with pytest.raises(ConfigError, match="batch_size=0"):
        build_loader(dataset, _ctx(), batch_size=0)
    assert build_loader(dataset, _ctx(1, 2), global_batch_size=4).batch_size == 2
    with pytest.warns(UserWarning, match="does not divide"):
        build_loader(TensorDataset(torch.arange(9).float()), _ctx(0, 2), batch_size=2)
