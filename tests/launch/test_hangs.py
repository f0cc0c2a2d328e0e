"""Hangs and stragglers: real launches whose ranks hang or slow down on purpose.

Each launch runs in its own session and is killed as a group if it outlives its bound; every
worker writes its pid so the test can check none is left.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from distrain.heartbeat import PERF_FILE, Beat, BeatWriter, beat_path, read_beats
from distrain.launchers.hang_report import diagnose, parse_faulthandler
from distrain.launchers.stack_collect import RankStacks
from distrain.launchers.straggler import StragglerTracker
from tests import helpers
from tests.helpers import PYTHON, REPO, assert_workers_gone, child_env, distrain, kill_group

# Launches still running when a test ends are killed with their session.
launches = helpers.launches
SCRIPT = REPO / "tests" / "scripts" / "hang_train.py"
LAUNCH_BOUND_S = 240  # the machine is shared and small: start-up alone can take 30 s


def marked_line(marker: str) -> int:
    """The line number of the script line carrying ``# HANG: marker``."""
    for number, line in enumerate(SCRIPT.read_text().splitlines(), start=1):
        if f"# HANG: {marker}" in line:
            return number
    raise AssertionError(f"no '# HANG: {marker}' line in {SCRIPT}")


class Launch:
    """``distrain launch`` in its own session; its merged output read line by line, timed."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "distrain", "launch", *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=REPO, start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append((time.monotonic(), line))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, text: str, seconds: float = LAUNCH_BOUND_S) -> float:
        """When ``text`` first appeared in the output; fails if it does not within ``seconds``."""
        deadline = time.monotonic() + seconds
        with self._changed:
            while True:
                for seen, line in self.lines:
                    if text in line:
                        return seen
                left = deadline - time.monotonic()
                assert left > 0 and (self.proc.poll() is None or self._reader.is_alive()), \
                    f"{text!r} not seen; output:\n{self.text}"
                self._changed.wait(min(left, 1.0))

    def finish(self, seconds: float = LAUNCH_BOUND_S) -> int:
        try:
            code = self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            kill_group(self.proc.pid)
            self.proc.wait()
            raise AssertionError(f"the launch outlived {seconds} s:\n{self.text}") from None
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        kill_group(self.proc.pid)
        self.proc.wait()


def start(launches: list[Launch], *args: str) -> Launch:
    launch = Launch(*args)
    launches.append(launch)
    return launch


# ---------------------------------------------------------------------------- no processes


@pytest.mark.parametrize("value", ["abc", "-1", "inf"])
def test_a_bad_hang_timeout_is_one_line_and_exit_2(value: str) -> None:
    result = distrain("launch", "--hang-timeout", value, str(SCRIPT), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--hang-timeout" in lines[0] and value in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def _dump(*frames: tuple[str, int, str]) -> str:
    body = "\n".join(f'  File "{file}", line {line} in {func}' for file, line, func in frames)
    return f"Current thread 0x00000000000000aa (most recent call first):\n{body}\n"


def test_the_record_names_the_rank_that_never_entered_the_collective() -> None:
    torch_file = "/usr/lib/python3/site-packages/torch/autograd/graph.py"
    waiting = RankStacks(rank=0, pid=10, host="h", python=_dump(
        (torch_file, 9, "_engine_run_backward"), ("/job/train.py", 40, "main")),
        record={"entries": [{"collective_seq_id": 7, "pg_id": 0, "retired": True},
                            {"collective_seq_id": 8, "pg_id": 0, "retired": False,
                             "profiling_name": "gloo:all_reduce"}]})
    stuck = RankStacks(rank=1, pid=11, host="h", python=_dump(("/job/data.py", 12, "load"),
                                                              ("/job/train.py", 38, "main")),
                       record={"entries": [{"collective_seq_id": 7, "pg_id": 0, "retired": True}]})
    found = diagnose({0: waiting, 1: stuck}, {})
    assert [s.rank for s in found.stuck] == [1] and [s.rank for s in found.waiting] == [0]
    assert found.stuck[0].at is not None and found.stuck[0].at.line == 12
    assert "rank 1 never entered collective #8 (all_reduce) that rank 0 is waiting in" in found.how
    assert [t.ident for t in parse_faulthandler(stuck.python)] == [0xAA]


def test_a_heartbeat_reads_back_what_the_worker_stored(tmp_path: Path) -> None:
    path = beat_path(tmp_path, 3)
    writer = BeatWriter(path, rank=3, attempt=1, main_thread=77, host="node7")
    writer.update(phase="backward", step=True, now=5.0, step_time=0.25)
    beat = read_beats(tmp_path)[3]
    assert (beat.attempt, beat.main_thread, beat.host, beat.phase) == (1, 77, "node7", "backward")
    assert (beat.steps, beat.events, beat.last_event, beat.step_time) == (1, 1, 5.0, 0.25)


def test_the_straggler_warning_comes_once_per_episode(tmp_path: Path) -> None:
    warned: list[str] = []
    tracker = StragglerTracker(tmp_path, window=3, warn=warned.append)
    done = [0]

    def steps(times: dict[int, float], count: int) -> None:
        for _ in range(count):
            done[0] += 1
            tracker.observe({rank: Beat(pid=1, main_thread=1, attempt=0, rank=rank, phase="running",
                                        steps=done[0], events=1, last_event=0.0,
                                        phase_since=0.0, step_time=t, step_started=0.0, host="h")
                             for rank, t in times.items()})

    steps({0: 0.1, 1: 0.1, 2: 0.1}, 3)
    steps({0: 0.1, 1: 0.1, 2: 0.4}, 6)
    assert len(warned) == 1 and warned[0].startswith("distrain: rank 2 on h is a straggler")
    steps({0: 0.1, 1: 0.1, 2: 0.1}, 3)
    steps({0: 0.5, 1: 0.1, 2: 0.1}, 3)
    assert len(warned) == 2 and "rank 0 on h" in warned[1]
    figures = json.loads((tmp_path / PERF_FILE).read_text())
    assert figures["slowest_rank"] == 0 and figures["step_time_max_over_median"] == pytest.approx(5)


# ---------------------------------------------------------------------------- real launches


def test_a_hung_rank_is_named_with_its_line_and_the_group_stopped(
        tmp_path: Path, launches: list[Launch]) -> None:
    logs, pids = tmp_path / "logs", tmp_path / "pids"
    pids.mkdir()
    launch = start(launches, "--nproc-per-node", "2", "--hang-timeout", "10", "--log-dir", str(logs),
                   str(SCRIPT), "--hang-rank", "1", "--hang-step", "5", "--pids", str(pids))
    hung_at = launch.wait_for("HANGING NOW")
    assert launch.finish() == 1, launch.text
    took = launch.lines[-1][0] - hung_at
    assert took < 30, f"the launcher exited {took:.0f} s after the hang:\n{launch.text}"
    summary = launch.text[launch.text.index("distrain: hang:"):]
    first = next(line for line in summary.splitlines() if line.strip().startswith(("stuck", "waiting")))
    assert first.strip().startswith("stuck: rank 1 ") and \
        f"hang_train.py:{marked_line('sleep')} in main" in first, summary
    assert "waiting: rank 0 " in summary and "all_reduce" in summary and "in backward" in summary
    assert "rank 1 never entered collective #" in summary, summary
    rank0 = (logs / "stacks" / "hang-attempt0" / "rank0.txt").read_text()
    assert "_engine_run_backward" in rank0 and "in backward" in rank0, rank0
    assert (logs / "stacks" / "hang-attempt0" / "rank1.txt").exists()
    assert_workers_gone(pids)


def test_a_hung_group_restarts_and_completes(tmp_path: Path, launches: list[Launch]) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    launch = start(launches, "--nproc-per-node", "2", "--hang-timeout", "10", "--max-restarts", "1",
                   "--log-dir", str(tmp_path / "logs"), str(SCRIPT), "--hang-rank", "1",
                   "--hang-step", "5", "--steps", "8",
                   "--ckpt", str(tmp_path / "ckpt"), "--pids", str(pids))
    assert launch.finish() == 0, launch.text
    assert "restarting it (1 of 1)" in launch.text and "stuck: rank 1 " in launch.text
    assert "finished 8 steps (attempt 1)" in launch.text, launch.text
    assert_workers_gone(pids)


def test_a_rank_stuck_in_its_dataloader_is_named(tmp_path: Path, launches: list[Launch]) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    launch = start(launches, "--nproc-per-node", "4", "--hang-timeout", "10",
                   "--log-dir", str(tmp_path / "logs"), str(SCRIPT),
                   "--hang-rank", "2", "--hang-step", "3", "--loader-hang", "--pids", str(pids))
    assert launch.finish() == 1, launch.text
    summary = launch.text[launch.text.index("distrain: hang:"):]
    stuck = [line.strip() for line in summary.splitlines() if line.strip().startswith("stuck:")]
    assert len(stuck) == 1 and stuck[0].startswith("stuck: rank 2 ") and "data loading" in stuck[0] \
        and f"hang_train.py:{marked_line('loader')} in __getitem__" in stuck[0], summary
    assert all(f"waiting: rank {rank} " in summary for rank in (0, 1, 3)), summary
    assert_workers_gone(pids)


def test_a_slow_rank_is_warned_about_once_and_logged(tmp_path: Path, launches: list[Launch]) -> None:
    tb = tmp_path / "tb"
    launch = start(launches, "--nproc-per-node", "2", str(SCRIPT), "--steps", "32",
                   "--slow-rank", "1", "--slow-steps", "5:30", "--slow-s", "0.3", "--tb", str(tb))
    assert launch.finish() == 0, launch.text
    warnings = [line for _, line in launch.lines if "is a straggler" in line]
    assert len(warnings) == 1 and "rank 1 on " in warnings[0], launch.text
    events = EventAccumulator(str(tb), size_guidance={SCALARS: 0})
    events.Reload()
    slowest = [point.value for point in events.Scalars("perf/slowest_rank")]
    ratios = [point.value for point in events.Scalars("perf/step_time_max_over_median")]
    assert 1.0 in slowest and max(ratios) > 1.5, (slowest, ratios)


def test_sigusr1_and_distrain_stacks_print_every_rank_and_the_run_goes_on(
        tmp_path: Path, launches: list[Launch]) -> None:
    ready = tmp_path / "ready"
    logs = tmp_path / "logs"
    launch = start(launches, "--nproc-per-node", "2", "--log-dir", str(logs), str(SCRIPT),
                   "--steps", "6", "--ready", str(ready), "--ready-step", "2")
    deadline = time.monotonic() + LAUNCH_BOUND_S
    while not ready.exists():
        assert launch.proc.poll() is None and time.monotonic() < deadline, launch.text
        time.sleep(0.1)
    while not read_beats_of_launch(launch.proc.pid):
        assert time.monotonic() < deadline, launch.text
        time.sleep(0.1)
    launch.proc.send_signal(signal.SIGUSR1)
    launch.wait_for("distrain: stacks of every rank", seconds=60)
    launch.wait_for("--- rank 1 ", seconds=30)
    printed = distrain("stacks", str(launch.proc.pid), "--no-native", timeout=60)
    assert printed.returncode == 0, printed.stderr
    assert "--- rank 0 " in printed.stdout and "--- rank 1 " in printed.stdout
    assert "hang_train.py" in printed.stdout, printed.stdout
    Path(str(ready) + ".go").write_text("go")
    assert launch.finish() == 0, launch.text
    assert "finished 6 steps" in launch.text
    assert {p.name for p in (logs / "stacks" / "dump1").glob("rank*.txt")} == {"rank0.txt", "rank1.txt"}


def read_beats_of_launch(pid: int) -> bool:
    """The launch's ranks have all started beating (from the registry ``distrain stacks`` uses)."""
    from distrain.launchers.watchdog import registry_dir

    try:
        entry = json.loads((registry_dir() / f"{pid}.json").read_text())
    except (OSError, ValueError):
        return False
    return len(read_beats(entry["watch_dir"])) == 2


def test_a_collective_timeout_names_the_rank_that_never_arrived(
        tmp_path: Path, launches: list[Launch]) -> None:
    """Hang detection off (0): the group's own 10 s timeout fires on rank 0, the waiting rank."""
    logs, pids = tmp_path / "logs", tmp_path / "pids"
    pids.mkdir()
    launch = start(launches, "--nproc-per-node", "2", "--hang-timeout", "0", "--log-dir", str(logs),
                   str(SCRIPT), "--hang-rank", "1", "--hang-step", "5", "--collective-timeout", "10",
                   "--pids", str(pids))
    assert launch.finish() == 1, launch.text
    summary = launch.text[launch.text.index("distrain: a collective timed out on rank 0"):]
    stuck = [line.strip() for line in summary.splitlines() if line.strip().startswith("stuck:")]
    assert stuck and stuck[0].startswith("stuck: rank 1 ") and \
        f"hang_train.py:{marked_line('sleep')} in main" in stuck[0], summary
    assert "distrain: hang:" not in launch.text  # --hang-timeout 0: only the timeout fired
    assert (logs / "stacks" / "timeout-attempt0" / "rank1.txt").exists()
    assert_workers_gone(pids)
