"""Resume after a real SIGKILL: the TensorBoard step axis continues, no duplicates, in order."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from distrain.logging import metrics as m
from distrain.logging.report import main as report_main
from tests.helpers import PYTHON, REPO, assert_ok, child_env, distrain, kill_group

SCRIPT = str(REPO / "tests" / "scripts" / "logging_resume.py")
STEPS, CKPT_EVERY, HANG_AFTER = 10, 4, 6


def read_steps(tb: Path, tag: str = m.LOSS) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(tb), size_guidance={SCALARS: 0})
    acc.Reload()
    return [(e.step, e.wall_time) for e in acc.Scalars(tag)]


def wait_for_line(proc: subprocess.Popen[str], marker: str) -> str:
    """Read the run's output until ``marker`` shows up (the pytest timeout bounds the wait)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return line
    raise AssertionError(f"run ended without {marker!r}:\n{''.join(seen)[-3000:]}")


@pytest.mark.timeout(150)
def test_resume_after_sigkill_has_strictly_increasing_unique_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    launch = [PYTHON, "-m", "distrain", "launch", "--nproc-per-node", "2", SCRIPT, str(tmp_path),
              "--steps", str(STEPS), "--ckpt-every", str(CKPT_EVERY)]
    first = subprocess.Popen([*launch, "--hang-after", str(HANG_AFTER)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=child_env(),
                             start_new_session=True)
    try:
        rank0 = int(wait_for_line(first, "ready-to-kill").split()[-1])
        os.kill(rank0, signal.SIGKILL)  # no flush, no cleanup: a crash
        output, _ = first.communicate(timeout=60)
    finally:
        kill_group(first.pid)
        first.communicate()
    assert first.returncode != 0 and "SIGKILL" in output, output[-3000:]
    # The killed run logged past its last checkpoint (step 4): steps 5 and 6 will be redone.
    killed = read_steps(tmp_path / "tb")
    assert [s for s, _ in killed] == list(range(1, HANG_AFTER + 1))

    resumed_at = time.time()
    assert_ok(distrain(*launch[3:], timeout=90))

    final = read_steps(tmp_path / "tb")
    steps = [s for s, _ in final]
    assert steps == list(range(1, STEPS + 1))  # strictly increasing, no duplicates, no gaps
    start = CKPT_EVERY + 1
    assert all(t < resumed_at for s, t in final if s < start)  # kept from the first run
    assert all(t >= resumed_at for s, t in final if s >= start)  # 5, 6 redone by the second
    for tag in (m.GRAD_NORM, m.SAMPLES_PER_S, m.RSS):
        assert [s for s, _ in read_steps(tmp_path / "tb", tag)] == list(range(1, STEPS + 1))

    # The report reads the same de-duplicated axis.
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report.png")]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines()
               if line.split()[:1] == [m.LOSS])
    assert row[1] == str(STEPS) and row[-1] == str(STEPS)
