"""Fault tolerance end to end, with real processes: the 3-trial version of bench/fault_trials.py.

Each trial SIGKILLs a random rank of a real 2-rank ``distrain launch --max-restarts 2`` run at a
random moment (the third one while a checkpoint is being written); the restarted group resumes and
must end with weights and optimizer state bit-identical to an uninterrupted run. Then preemption
(SIGTERM to the launcher: checkpoint within the grace period, exit 143, the relaunch ends
identical) and a hang (a stuck rank; the collective timeout fails the job, naming the rank).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.fault_trials import PREEMPT_EXIT, hang, preemption, reference_run, run_trial

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The uninterrupted run's final.pt and how long its training took."""
    return reference_run(tmp_path_factory.mktemp("reference"), "forkserver")


@pytest.mark.timeout(300)
def test_three_random_kills_each_end_bit_identical(reference: tuple[Path, float], tmp_path: Path) -> None:
    final, train_s = reference
    rng = random.Random(8)
    trials = [run_trial(index, tmp_path, final, max(train_s, 0.5), rng, "forkserver") for index in range(3)]
    for trial in trials:
        assert trial.killed and trial.restarted, f"trial {trial.index}: the kill missed the run ({trial})"
        assert trial.identical, f"trial {trial.index} ended with different weights: {trial}"
        assert trial.leftovers == 0
    assert trials[2].mode == "mid-checkpoint" and trials[2].mid_checkpoint, trials[2]


@pytest.mark.timeout(240)
def test_preemption_saves_within_the_grace_period_and_the_relaunch_ends_identical(
        reference: tuple[Path, float], tmp_path: Path) -> None:
    result = preemption(tmp_path, reference[0], random.Random(3), "forkserver", grace=20.0)
    assert result.exit_code == PREEMPT_EXIT == 143
    assert result.saved_step is not None and 20 <= result.saved_step < 60, result
    assert result.checkpoint_verified, "the preemption checkpoint is missing or incomplete"
    assert result.seconds_to_exit < result.grace_s, f"workers were not done within the grace: {result}"
    assert result.resumed_ok, "the relaunch did not resume from the preemption checkpoint"
    assert result.identical, "preempted + resumed run differs from the uninterrupted one"


@pytest.mark.timeout(180)
def test_a_stuck_rank_fails_the_job_by_the_collective_timeout(tmp_path: Path) -> None:
    timeout = 5.0
    result = hang(tmp_path, timeout=timeout)
    assert result.exit_code == 1, result.summary
    assert result.names_failed_rank, f"the summary does not name rank 0 and its timeout:\n{result.summary}"
    # The timeout ended it (not the end of training, not a crash), and teardown was prompt. The
    # clock starts when rank 1 stops (rank 0 may enter its collective a moment before that).
    assert 0.8 * timeout <= result.seconds_to_exit < timeout + 20, result
    assert result.leftovers == 0
