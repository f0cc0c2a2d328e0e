"""distrain.preemption.StopSignal: a real SIGTERM becomes a flag all ranks agree on at one step."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from distrain.ddp import Context
from distrain.preemption import StopSignal
from tests.helpers import spawn_multi_process


def test_a_signal_sets_the_flag_instead_of_ending_the_process() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignal()
    try:
        assert not stop.requested and not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before kill returns
        assert stop.requested and stop.received is signal.SIGTERM
        assert stop.agreed()  # no process group: this rank's own flag
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_loggers_flush_still_runs_but_not_its_default_exit(tmp_path: Path) -> None:
    from distrain.logging import TBLogger
    from tests.helpers.tb import points, read

    ctx = Context(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                  device=torch.device("cpu"), backend=None, is_main=True)
    tb = TBLogger(tmp_path, ctx, flush_secs=600)
    stop = StopSignal()  # installed after the logger: its handler is the previous one
    try:
        tb.scalar("train/loss", 0.5, 1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        assert points(read(tmp_path), "train/loss") == [(1, 0.5)]  # flushed by the logger's handler
    finally:
        stop.restore()
        tb.close()


def _agree_on_a_step(ctx: Context) -> list[int]:
    stop = StopSignal()
    seen = []
    for step in range(1, 9):
        if ctx.rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is told
        if stop.agreed():
            seen.append(step)
    stop.restore()
    return seen


@pytest.mark.timeout(120)
def test_every_rank_agrees_at_the_same_step() -> None:
    assert spawn_multi_process(2, "gloo", _agree_on_a_step) == {0: list(range(3, 9)), 1: list(range(3, 9))}


def test_only_the_main_thread_can_install_it() -> None:
    import threading

    from distrain.errors import ConfigError

    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: errors.append(_try_install()))
    thread.start()
    thread.join()
    assert isinstance(errors[0], ConfigError) and "main thread" in str(errors[0])


def _try_install() -> BaseException | None:
    try:
        StopSignal()
    except BaseException as error:
        return error
    return None
