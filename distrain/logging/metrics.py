"""The standard set of training numbers, reduced over ranks so the logs reflect every rank.

Every rank calls these at the same steps (they use collectives); rank 0's TBLogger writes::

    timer = StepTimer(ctx)
    for x, y in timer.wrap(loader):                 # times the wait for each batch
        ...; loss.backward(); gn = grad_norm(model); optimizer.step(); step += 1
        timer.lap(samples=len(x))                   # local samples of this step
        if step % log_every == 0:
            tb.scalars(train_scalars(ctx, loss=loss, lr=lr, epoch=epoch, grad_norm=gn,
                                     stats=timer.window()), step)
    tb.scalars(eval_scalars(ctx, correct=c, count=n, loss_sum=s), step)

Tags (the report and the docs use these names): ``train/loss`` (mean over ranks), ``train/lr``,
``train/epoch``, ``train/grad_norm``, ``perf/samples_per_s`` (global), ``perf/step_time_s``,
``perf/data_wait_fraction``, ``memory/rss_mb`` or ``memory/cuda_max_allocated_mb`` (the largest
rank), ``eval/accuracy`` and ``eval/loss`` (over all ranks' samples).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from distrain.collectives import reduce_max
from distrain.errors import ConfigError
from distrain.logging.scalars import to_float

if TYPE_CHECKING:
    import torch

    from distrain.context import Context

__all__ = [
    "CUDA_MEMORY",
    "DATA_WAIT",
    "EPOCH",
    "EVAL_ACCURACY",
    "EVAL_LOSS",
    "GRAD_NORM",
    "LOSS",
    "LR",
    "RSS",
    "SAMPLES_PER_S",
    "STEP_TIME",
    "StepStats",
    "StepTimer",
    "eval_scalars",
    "grad_norm",
    "memory_mb",
    "reduce_max",
    "train_scalars",
]

LOSS = "train/loss"
LR = "train/lr"
EPOCH = "train/epoch"
GRAD_NORM = "train/grad_norm"
SAMPLES_PER_S = "perf/samples_per_s"
STEP_TIME = "perf/step_time_s"
DATA_WAIT = "perf/data_wait_fraction"
RSS = "memory/rss_mb"
CUDA_MEMORY = "memory/cuda_max_allocated_mb"
EVAL_ACCURACY = "eval/accuracy"
EVAL_LOSS = "eval/loss"
MIB = float(2**20)
T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class StepStats:
    """Timing of one or more steps: mean step time, mean data wait, global throughput."""

    steps: int
    seconds: float  # wall time of these steps
    data_seconds: float  # of which: waiting for the next batch
    samples: int  # global samples (all ranks) in these steps

    @property
    def step_time_s(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return min(1.0, self.data_seconds / self.seconds) if self.seconds > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


class StepTimer:
    """Measures step time, the part of it spent waiting on data, and global samples/s.

    A step runs from the moment its batch is requested to the matching :meth:`lap`. Global
    samples assume every rank processes as many samples as this one (true with
    ``DistributedSampler``, which pads ranks to equal length). On CUDA, ``lap`` synchronises
    the device first so the time is the GPU's, not the launch queue's.
    """

    def __init__(self, ctx: Context | None = None) -> None:
        self.world_size = ctx.world_size if ctx is not None else 1
        self.device = ctx.device if ctx is not None else None
        self._last: float | None = None
        self._data = 0.0
        self._window = [0, 0.0, 0.0, 0]  # steps, seconds, data seconds, samples
        self._total = [0, 0.0, 0.0, 0]

    def wrap(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield from ``iterable`` (e.g. a DataLoader), timing each wait for the next item.

        Each call starts a fresh baseline, so time spent between epochs (evaluation,
        checkpoints) is not counted as a training step.
        """
        iterator = iter(iterable)
        self._last = None
        while True:
            start = time.perf_counter()
            if self._last is None:
                self._last = start
            try:
                item = next(iterator)
            except StopIteration:
                return
            self._data += time.perf_counter() - start
            yield item

    def lap(self, samples: int) -> StepStats:
        """End a step that processed ``samples`` samples on this rank; its stats."""
        if samples < 0:
            raise ConfigError("samples", samples, ">= 0", "pass the batch size of this step")
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        start = self._last if self._last is not None else now
        seconds, data = now - start, self._data
        self._last, self._data = now, 0.0
        global_samples = samples * self.world_size
        for acc in (self._window, self._total):
            acc[0] += 1
            acc[1] += seconds
            acc[2] += data
            acc[3] += global_samples
        return StepStats(steps=1, seconds=seconds, data_seconds=data, samples=global_samples)

    def window(self) -> StepStats:
        """The steps since the last ``window()`` call (what to log every N steps); resets it."""
        stats = _stats(self._window)
        self._window = [0, 0.0, 0.0, 0]
        return stats

    def total(self) -> StepStats:
        """Every step timed so far (for the end-of-run summary)."""
        return _stats(self._total)


def _stats(acc: list[int | float]) -> StepStats:
    return StepStats(steps=int(acc[0]), seconds=float(acc[1]), data_seconds=float(acc[2]),
                     samples=int(acc[3]))


def grad_norm(model: torch.nn.Module | Iterable[torch.Tensor], norm_type: float = 2.0) -> float:
    """The total gradient norm after ``backward()`` (same on every rank under DDP).

    Sharded (FSDP) gradients are combined into the full norm. If you clip with
    ``clip_grad_norm_``, log the norm it returns instead.
    """
    import torch

    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, norm_type)
    full = getattr(total, "full_tensor", None)  # a DTensor under FSDP2
    if callable(full):
        total = full()
    return to_float(total)


def memory_mb(device: torch.device | None = None) -> dict[str, float]:
    """Peak CUDA memory allocated on a GPU device, this process's resident memory otherwise."""
    if device is not None and device.type == "cuda":
        import torch

        return {CUDA_MEMORY: torch.cuda.max_memory_allocated(device) / MIB}
    import psutil

    return {RSS: psutil.Process(os.getpid()).memory_info().rss / MIB}


def train_scalars(
    ctx: Context,
    *,
    loss: float | torch.Tensor,
    lr: float,
    epoch: float,
    stats: StepStats | None = None,
    grad_norm: float | torch.Tensor | None = None,
    memory: bool = True,
) -> dict[str, float]:
    """The standard training scalars, reduced over ranks. Call on every rank at the same step,
    with the same arguments given (or left out) everywhere, or the collectives do not match.

    ``loss`` is this rank's loss; the result holds the mean over ranks (two collectives in all:
    one mean, one max for memory). ``stats``: usually ``timer.window()``.
    """
    from distrain.collectives import all_reduce_mean

    means: dict[str, float] = {LOSS: to_float(loss)}
    if grad_norm is not None:
        means[GRAD_NORM] = to_float(grad_norm)
    if stats is not None and stats.steps:
        means[SAMPLES_PER_S] = stats.samples_per_s
        means[STEP_TIME] = stats.step_time_s
        means[DATA_WAIT] = stats.data_wait_fraction
    # Every rank timed the same global steps, so the mean of their throughputs estimates it.
    result = dict(all_reduce_mean(means)) if ctx.world_size > 1 else means
    result[LR] = float(lr)
    result[EPOCH] = float(epoch)
    if memory:
        local = memory_mb(ctx.device)
        result.update(reduce_max(local) if ctx.world_size > 1 else local)
    return result


def eval_scalars(
    ctx: Context,
    *,
    correct: float | torch.Tensor,
    count: float | torch.Tensor,
    loss_sum: float | torch.Tensor | None = None,
) -> dict[str, float]:
    """Accuracy (and mean loss) over every rank's evaluation samples. Call on every rank.

    Each rank passes its own counts: ``correct`` predictions and ``loss_sum`` (summed, not
    averaged) over its ``count`` samples.
    """
    from distrain.collectives import all_reduce_mean

    local = {"correct": to_float(correct), "count": to_float(count)}
    if loss_sum is not None:
        local["loss_sum"] = to_float(loss_sum)
    # A ratio of means over ranks equals the ratio of sums: one collective, no sum op needed.
    means = all_reduce_mean(local) if ctx.world_size > 1 else local
    if means["count"] <= 0:
        raise ConfigError("count", count, "evaluation samples on at least one rank",
                          "evaluate on a non-empty dataset")
    result = {EVAL_ACCURACY: means["correct"] / means["count"]}
    if loss_sum is not None:
        result[EVAL_LOSS] = means["loss_sum"] / means["count"]
    return result
