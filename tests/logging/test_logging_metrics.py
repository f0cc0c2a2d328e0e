"""The standard-set helpers in one process (the 2-rank reductions are in test_logging_tb.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from distrain.ddp import Context
from distrain.errors import ConfigError
from distrain.logging import StepTimer, eval_scalars, grad_norm, memory_mb, train_scalars
from distrain.logging import metrics as m

PAUSE = 0.03


def context(world_size: int = 1) -> Context:
    return Context(rank=0, local_rank=0, world_size=world_size, local_world_size=world_size,
                   node_rank=0, device=torch.device("cpu"), backend=None, is_main=True)


def slow_batches(count: int) -> Iterator[int]:
    for index in range(count):
        time.sleep(PAUSE)  # a data loader that keeps the step waiting (the workload, not a sync)
        yield index


def test_waiting_on_data_shows_in_the_fraction() -> None:
    timer = StepTimer(context(world_size=4))
    for _ in timer.wrap(slow_batches(4)):
        timer.lap(samples=8)
    stats = timer.window()
    assert stats.steps == 4 and stats.samples == 4 * 8 * 4  # global: every rank's samples
    assert stats.data_seconds >= 4 * PAUSE
    assert stats.data_wait_fraction > 0.8
    assert stats.samples_per_s == pytest.approx(stats.samples / stats.seconds)
    assert timer.window().steps == 0  # the window resets; the total does not
    assert timer.total().steps == 4


def test_compute_bound_steps_wait_little() -> None:
    timer = StepTimer(context())
    for _ in timer.wrap(range(3)):
        end = time.perf_counter() + PAUSE
        while time.perf_counter() < end:  # busy "compute"
            pass
        stats = timer.lap(samples=2)
        assert stats.step_time_s >= PAUSE and stats.data_wait_fraction < 0.2
    with pytest.raises(ConfigError, match="samples=-1"):
        timer.lap(samples=-1)


def test_time_between_epochs_is_not_a_step() -> None:
    timer = StepTimer(context())
    for _ in timer.wrap(range(2)):
        timer.lap(samples=1)
    between = 0.3
    time.sleep(between)  # evaluation between epochs: must not land in the next step
    for _ in timer.wrap(range(1)):
        stats = timer.lap(samples=1)
    assert stats.seconds < between


def test_grad_norm_equals_clip_grad_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    assert grad_norm(model) == 0.0  # before backward: no gradients
    model(torch.randn(4, 5)).pow(2).sum().backward()
    expected = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"), 2.0))
    assert grad_norm(model) == pytest.approx(expected, rel=1e-6)
    assert grad_norm(list(model.parameters())) == pytest.approx(expected, rel=1e-6)


def test_single_process_standard_set() -> None:
    timer = StepTimer(context())
    for _ in timer.wrap(range(2)):
        timer.lap(samples=4)
    values = train_scalars(context(), loss=torch.tensor(0.5, requires_grad=True), lr=0.1,
                           epoch=2, stats=timer.window(), grad_norm=torch.tensor(3.0))
    assert set(values) == {m.LOSS, m.LR, m.EPOCH, m.GRAD_NORM, m.SAMPLES_PER_S, m.STEP_TIME,
                           m.DATA_WAIT, m.RSS}
    assert (values[m.LOSS], values[m.LR], values[m.EPOCH], values[m.GRAD_NORM]) == (
        0.5, 0.1, 2.0, 3.0)
    assert values[m.RSS] > 10
    assert set(memory_mb(torch.device("cpu"))) == {m.RSS}
    assert eval_scalars(context(), correct=3, count=4, loss_sum=2.0) == {
        m.EVAL_ACCURACY: 0.75, m.EVAL_LOSS: 0.5}
    with pytest.raises(ConfigError, match="count=0"):
        eval_scalars(context(), correct=0, count=0)
