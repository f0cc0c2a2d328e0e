"""The start-up benchmark's launches run as written (``make bench`` once failed on an example
option that had been removed: only a full benchmark run would have seen it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.startup import start_once


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["distrain", "torchrun"])
def test_a_start_up_launch_of_the_digits_example_stamps_its_first_barrier_and_step(
        tmp_path: Path, launcher: str) -> None:
    start = start_once(launcher, 2, tmp_path, "run")
    assert 0 < start.barrier_s <= start.step_s <= start.total_s
    assert not (tmp_path / "run").exists()  # the benchmark's own cleanup
