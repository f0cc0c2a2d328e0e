"""``ResumableDistributedSampler``: DistributedSampler that resumes mid-epoch, on any world size.

The rule that makes world-size-invariant resume possible: the **global order** of an epoch is a
permutation that depends only on ``seed`` and ``epoch`` (exactly ``DistributedSampler``'s
``randperm``), and rank ``r`` of ``W`` takes positions ``r, r+W, r+2W, ...`` of it. After every
rank consumed ``c`` samples, the consumed samples are exactly the first ``c * W`` of the global
order: a prefix. The state is therefore one number, ``consumed`` (global samples), and a run
resumed on ``W'`` ranks deals out the rest of the same order, ``order[consumed:]``, the same
way. Nothing is repeated and nothing skipped, whatever W and W' are (the only repeats are the
padding ``DistributedSampler`` itself adds so every rank gets as many samples, when
``drop_last=False``).

For the same settings and no resume, the indices are identical to ``DistributedSampler``'s.
Progress counts what the training loop consumed, not what loader workers prefetched: the
loader from :func:`distrain.data.build_loader` reports each batch as it hands it out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from distrain.errors import ConfigError


def global_order(length: int, *, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The epoch's order of all samples: ``DistributedSampler``'s permutation."""
    if not shuffle:
        return list(range(length))
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(length, generator=generator).tolist()


def rank_indices(
    remaining: list[int], *, rank: int, world_size: int, drop_last: bool
) -> list[int]:
    """Deal ``remaining`` out to ranks as ``DistributedSampler`` does (pad or drop the tail)."""
    if drop_last and len(remaining) % world_size:
        per_rank = len(remaining) // world_size
    else:
        per_rank = math.ceil(len(remaining) / world_size)
    total = per_rank * world_size
    if total > len(remaining) and remaining:
        pad = total - len(remaining)
        repeats = math.ceil(pad / len(remaining))
        remaining = remaining + (remaining * repeats)[:pad]
    return remaining[:total][rank:total:world_size]


class ResumableDistributedSampler(DistributedSampler):  # type: ignore[type-arg]
    """A ``DistributedSampler`` with ``state_dict()`` / ``load_state_dict()``.

    Use it like ``DistributedSampler`` (``set_epoch`` every epoch). ``num_replicas`` and ``rank``
    default to the running process group, or a world of one without one.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        import torch.distributed as dist

        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,  # type: ignore[arg-type]
                         seed=seed, drop_last=drop_last)
        self._resume_from = 0  # global samples already consumed when the next __iter__ starts
        self._iter_start = 0  # global samples consumed before the current pass began
        self._local_consumed = 0  # samples this rank handed to the training loop in this pass

    # -- what DistributedSampler does, starting from a resume point -----------------------

    def _indices(self, consumed: int) -> list[int]:
        order = global_order(len(self.dataset), epoch=self.epoch, seed=self.seed,  # type: ignore[arg-type]
                             shuffle=self.shuffle)
        return rank_indices(order[consumed:], rank=self.rank, world_size=self.num_replicas,
                            drop_last=self.drop_last)

    def __iter__(self) -> Iterator[int]:
        self._iter_start, self._resume_from = self._resume_from, 0
        self._local_consumed = 0
        indices = self._indices(self._iter_start)
        self.num_samples = len(indices)
        return iter(indices)

    def __len__(self) -> int:
        return len(self._indices(self._resume_from)) if self._resume_from else self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; a resume point loaded for this same epoch is kept."""
        if epoch != self.epoch:
            self._resume_from = 0
        super().set_epoch(epoch)

    # -- progress ------------------------------------------------------------------------

    def record_consumed(self, num_samples: int) -> None:
        """The training loop took ``num_samples`` more samples from this rank (called by the loader)."""
        self._local_consumed += num_samples

    @property
    def consumed(self) -> int:
        """Global samples of this epoch already consumed (the resume point)."""
        if self._resume_from:
            return self._resume_from
        total = self._iter_start + self._local_consumed * self.num_replicas
        return min(total, len(self.dataset))  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_length": len(self.dataset),  # type: ignore[arg-type]
            "world_size": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        length = len(self.dataset)  # type: ignore[arg-type]
        if int(state["dataset_length"]) != length:
            raise ConfigError(
                "sampler state dataset_length", state["dataset_length"],
                f"the current dataset's length {length}",
                "resume with the same dataset (its order depends on its length)",
            )
        if int(state["seed"]) != self.seed or bool(state["shuffle"]) != self.shuffle:
            raise ConfigError(
                "sampler state seed/shuffle", (state["seed"], state["shuffle"]),
                f"seed={self.seed}, shuffle={self.shuffle} as in this run",
                "pass the same seed and shuffle as the checkpointed run",
            )
        self.epoch = int(state["epoch"])
        consumed = int(state["consumed"])
        # A finished epoch resumes at the start of the next one.
        if consumed >= length or (self.drop_last and length - consumed < self.num_replicas):
            self.epoch, consumed = self.epoch + 1, 0
        self._resume_from = consumed
        self._iter_start, self._local_consumed = consumed, 0
