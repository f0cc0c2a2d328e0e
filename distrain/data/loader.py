"""``build_loader``: a DataLoader on a :class:`ResumableDistributedSampler` with sane defaults.

The loader counts the batches the training loop actually took (not what workers prefetched)
and reports them to the sampler, so ``loader.state_dict()`` at any step is an exact resume point.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterator, Sized
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distrain import stacks
from distrain.data.sampler import ResumableDistributedSampler
from distrain.errors import ConfigError
from distrain.group import resolve

if TYPE_CHECKING:
    from distrain.context import Context


_END = object()  # the end of the underlying loader's iterator


class ResumableLoader(DataLoader):  # type: ignore[type-arg]
    """A DataLoader whose progress is saved with ``state_dict()`` and restored exactly."""

    sampler: ResumableDistributedSampler
    #: Micro-batches per optimizer step on each rank (``global_batch_size / (batch_size * world)``).
    accumulation_steps: int = 1
    #: Samples per optimizer step over all ranks.
    global_batch_size: int = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        batches = super().__iter__()
        while True:
            with stacks.phase("data loading"):  # the hang watch names a rank stuck here
                batch = next(batches, _END)
            if batch is _END:
                return
            sampler.record_consumed(self.batch_size or 1)
            yield batch

    def __len__(self) -> int:
        samples = len(self.sampler)
        size = self.batch_size or 1
        return samples // size if self.drop_last else -(-samples // size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return int(self.sampler.epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        # A remainder smaller than one batch is dropped anyway: the epoch is over.
        if self.drop_last and 0 < len(self.sampler) < (self.batch_size or 1):
            self.sampler.load_state_dict({**state["sampler"], "consumed": len(self.dataset)})  # type: ignore[arg-type]


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a loader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(
    dataset: Dataset[Any],
    ctx: Context | None = None,
    batch_size: int | None = None,
    *,
    global_batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int | None = None,
    pin_memory: bool | str = "auto",
    drop_last: bool = False,
    persistent_workers: bool | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    prefetch_factor: int | None = None,
) -> ResumableLoader:
    """A resumable, rank-sharded DataLoader.

    ``batch_size`` is per rank (a micro-batch); ``global_batch_size`` is what one optimizer step
    consumes over all ranks. Given alone, it is divided by the world size; given with
    ``batch_size``, every rank accumulates ``loader.accumulation_steps = global_batch_size /
    (batch_size * world_size)`` micro-batches per step (``ddp.accumulate``), so a step takes the
    same samples, and the same math, whatever the world size (also after an elastic resize).
    ``num_workers`` defaults to 0 on CPU-only hosts with few cores, else 2; worker processes are
    seeded and persistent. Randomness inside the dataset should come from the sample index (or
    the per-worker seed) for bit-exact resume; the shuffle order itself is always exact.

    Args:
        dataset: A map-style dataset (with ``__len__``).
        ctx: The worker's context; the current one by default.
        batch_size: Samples per rank per micro-batch.
        global_batch_size: Samples per optimizer step over all ranks.
        shuffle: Shuffle every epoch (from ``seed`` and the epoch: the same on every rank).
        seed: The shuffle and worker seed.
        num_workers: DataLoader worker processes (default as above).
        pin_memory: ``"auto"`` pins when the context's device is CUDA.
        drop_last: Drop the last incomplete batch of each rank.
        persistent_workers: Keep worker processes between epochs (default: when there are some).
        collate_fn: As DataLoader's.
        prefetch_factor: As DataLoader's.

    Returns:
        A :class:`ResumableLoader`: iterate it; ``set_epoch``, ``state_dict`` and
        ``load_state_dict`` resume it mid-epoch on any world size.

    Raises:
        ConfigError: A dataset without ``__len__``, or batch sizes that do not divide.
    """
    ctx = resolve(ctx)
    per_rank, accumulation = batch_plan(batch_size, global_batch_size, ctx.world_size)
    length = len(dataset) if isinstance(dataset, Sized) else None
    if length is None:
        raise ConfigError("dataset", type(dataset).__name__, "a map-style Dataset with __len__",
                          "implement __len__ and __getitem__ (IterableDataset is not sharded here)")
    if length % ctx.world_size and ctx.is_main:
        warnings.warn(
            f"dataset length {length} does not divide by world size {ctx.world_size}: "
            f"{'the last samples are dropped' if drop_last else 'some samples are repeated as padding'}"
            " in each epoch", stacklevel=2)
    if num_workers is None:
        num_workers = 0 if (os.cpu_count() or 1) <= 2 else 2
    if num_workers < 0:
        raise ConfigError("num_workers", num_workers, ">= 0", "use 0 to load in the main process")
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    pin = ctx.device.type == "cuda" if pin_memory == "auto" else bool(pin_memory)
    sampler = ResumableDistributedSampler(
        cast(Sized, dataset), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
        drop_last=drop_last,
    )
    # A private generator: creating an iterator must not consume the global RNG, or a resumed
    # run's dropout masks would drift from the uninterrupted run's.
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + ctx.rank)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        extra["worker_init_fn"] = seed_worker
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    if accumulation > 1 and length % (per_rank * accumulation * ctx.world_size) and ctx.is_main:
        warnings.warn(
            f"dataset length {length} does not divide by global_batch_size "
            f"{per_rank * accumulation * ctx.world_size}: the last step of each epoch is smaller",
            stacklevel=2)
    loader = ResumableLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=num_workers, pin_memory=pin,
        drop_last=drop_last, collate_fn=collate_fn, generator=generator, **extra,
    )
    loader.accumulation_steps = accumulation
    loader.global_batch_size = per_rank * accumulation * ctx.world_size
    return loader


def batch_plan(batch_size: int | None, global_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """(per-rank micro-batch, accumulation steps) so that one step takes ``global_batch_size``."""
    if batch_size is None and global_batch_size is None:
        raise ConfigError("batch_size/global_batch_size", (batch_size, global_batch_size),
                          "at least one of them", "pass batch_size=... (per rank) or global_batch_size=...")
    if batch_size is not None and batch_size < 1:
        raise ConfigError("batch_size", batch_size, "a positive integer", "e.g. batch_size=32")
    if global_batch_size is None:
        return cast(int, batch_size), 1
    micro = batch_size or 1
    if global_batch_size < 1 or global_batch_size % (micro * world_size):
        per_step = micro * world_size
        expected = (f"a positive multiple of batch_size x world size = {micro} x {world_size} = {per_step}"
                    if batch_size else f"a positive multiple of the world size {world_size}")
        raise ConfigError(
            "global_batch_size", global_batch_size, expected,
            f"use e.g. {max(1, round(global_batch_size / per_step)) * per_step}"
            + (", or a batch_size that divides it" if batch_size else ""),
        )
    if batch_size is None:
        return global_batch_size // world_size, 1
    return batch_size, global_batch_size // (batch_size * world_size)
