"""The checkpoint-cost benchmark runs end to end and reports every row it judges (it runs only in
``make bench`` otherwise, where a broken row would go unseen until the next full run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.ckpt_stall import SEGMENT_REPS, run_bench


@pytest.mark.timeout(300)
def test_one_repetition_of_the_checkpoint_cost_bench_measures_every_row(tmp_path: Path) -> None:
    result = run_bench(1, steps=3, directory=tmp_path)
    stall = result["stall"]
    assert len(stall["blocked_s"]["async"]) == len(stall["blocked_s"]["blocking"]) == SEGMENT_REPS
    assert all(seconds > 0 for seconds in stall["blocked_s"]["blocking"])
    assert stall["bytes"] > 190 * 2**20  # the 195 MB state the README's rows describe
    assert result["save_cpu"]["median_cpu_s"]["blocking"] > 0
    assert result["throughput"]["ckpt_mb_s"] > 0 and result["throughput"]["dd_mb_s"] > 0
    assert list(tmp_path.iterdir()) == []  # nothing written is left behind
