"""Global batch size: one optimizer step takes the same samples at any world size, also across a resize."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from distrain.data import build_loader
from distrain.data.loader import ResumableLoader, batch_plan
from distrain.data.sampler import global_order
from distrain.ddp import Context
from distrain.errors import ConfigError

LENGTH, GLOBAL, MICRO = 96, 16, 2
DATASET = TensorDataset(torch.arange(LENGTH))


def ctx_of(rank: int, world_size: int) -> Context:
    """A rank's context without a process group (the loader only reads rank and world size)."""
    return Context(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                   node_rank=0, device=torch.device("cpu"), backend=None, is_main=rank == 0)


def loaders(world: int, state: dict[str, Any] | None = None) -> list[ResumableLoader]:
    made = [build_loader(DATASET, ctx_of(rank, world), batch_size=MICRO, global_batch_size=GLOBAL,
                         seed=5, num_workers=0) for rank in range(world)]
    for loader in made:
        if state is not None:
            loader.load_state_dict(state)
    return made


def take_steps(made: list[ResumableLoader], epoch: int, steps: int | None) -> list[set[int]]:
    """Run ``steps`` optimizer steps (all of the epoch when None) on every rank; samples per step."""
    streams = []
    for loader in made:
        loader.set_epoch(epoch)
        streams.append(iter(loader))
    accumulation = made[0].accumulation_steps
    taken: list[set[int]] = []
    while steps is None or len(taken) < steps:
        step: set[int] = set()
        try:
            for stream in streams:
                for _ in range(accumulation):
                    step.update(int(i) for i in next(stream)[0])
        except StopIteration:
            break
        taken.append(step)
    return taken


@pytest.mark.parametrize("world", [1, 2, 4])
def test_accumulation_is_derived_and_each_step_takes_the_same_samples(world: int) -> None:
    made = loaders(world)
    assert made[0].accumulation_steps == GLOBAL // (MICRO * world)
    assert made[0].global_batch_size == GLOBAL and made[0].batch_size == MICRO
    order = global_order(LENGTH, epoch=0, seed=5, shuffle=True)
    steps = take_steps(made, 0, None)
    assert steps == [set(order[s * GLOBAL:(s + 1) * GLOBAL]) for s in range(LENGTH // GLOBAL)]


def test_shrink_from_4_to_2_ranks_mid_epoch_takes_every_sample_once() -> None:
    before = loaders(4)
    first = take_steps(before, 1, 2)
    state = before[0].state_dict()
    assert state["sampler"]["consumed"] == 2 * GLOBAL
    after = loaders(2, state)
    assert after[0].accumulation_steps == 2 * before[0].accumulation_steps
    rest = take_steps(after, 1, None)
    order = global_order(LENGTH, epoch=1, seed=5, shuffle=True)
    assert first + rest == [set(order[s * GLOBAL:(s + 1) * GLOBAL]) for s in range(LENGTH // GLOBAL)]


def test_a_global_batch_that_does_not_divide_is_one_clear_error() -> None:
    assert batch_plan(MICRO, GLOBAL, 4) == (2, 2)
    assert batch_plan(None, GLOBAL, 4) == (4, 1)
    assert batch_plan(3, None, 4) == (3, 1)
    with pytest.raises(ConfigError, match=r"global_batch_size=20 is invalid: expected a positive "
                       r"multiple of batch_size x world size = 2 x 4 = 8; use e\.g\. 16"):
        build_loader(DATASET, ctx_of(0, 4), batch_size=2, global_batch_size=20)
    with pytest.raises(ConfigError, match="global_batch_size=6"):
        build_loader(DATASET, ctx_of(0, 4), global_batch_size=6)
