"""Console output: tqdm on a terminal, plain lines on a pipe or with DISTRAIN_PROGRESS=0."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import termios
from pathlib import Path

import pytest
import torch

from distrain.ddp import Context
from distrain.errors import ConfigError
from distrain.logging import (
    EpochProgress,
    flatten_config,
    format_config,
    print_config,
    print_summary,
    progress_mode,
    summary_line,
)
from tests.helpers import PYTHON, REPO, child_env, run_cmd

SCRIPT = str(REPO / "tests" / "scripts" / "logging_progress.py")
LINE = re.compile(r"^epoch 1 \| step +(\d+)/20 \( *\d+%\) \| loss ([\d.e-]+) \| "
                  r"samples/s (\d+) \| [\d.]+s$")


def context(rank: int) -> Context:
    return Context(rank=rank, local_rank=rank, world_size=2, local_world_size=2, node_rank=0,
                   device=torch.device("cpu"), backend=None, is_main=rank == 0)


def run_on_pty(extra_env: dict[str, str], size: tuple[int, int] = (0, 0)) -> str:
    """Run the progress script with stdout on a real pseudo-terminal; return what it wrote.

    ``size`` (rows, columns): a bare pty reports 0x0, a terminal window its real size.
    """
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    proc = subprocess.Popen([PYTHON, SCRIPT], stdout=terminal, stderr=subprocess.PIPE,
                            env=child_env(extra_env), start_new_session=True)
    os.close(terminal)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    return b"".join(chunks).decode()


def check_plain_lines(text: str) -> None:
    assert "\r" not in text.replace("\r\n", "\n")  # no carriage-return redraws: a log file
    lines = [line for line in text.replace("\r\n", "\n").splitlines() if line.startswith("epoch")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    steps = [int(match.group(1)) for match in matches if match]
    assert steps == list(range(2, 21, 2))  # every tenth of the epoch, the last step included
    last = matches[-1]
    assert last is not None and float(last.group(2)) == 0.05 and last.group(3) == "2000"


@pytest.mark.timeout(60)
def test_plain_lines_when_stdout_is_a_pipe() -> None:
    result = run_cmd([PYTHON, SCRIPT], timeout=60)
    assert result.returncode == 0, result.stderr
    check_plain_lines(result.stdout)
    assert result.stdout.startswith("config:\n  batch_size   32\n  lr           0.1\n")
    assert result.stdout.rstrip().splitlines()[-1].startswith("done: 20 steps in 2.0s")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [(40, 120), (0, 0)], ids=["window", "no-size"])
def test_tqdm_bar_on_a_terminal(size: tuple[int, int]) -> None:
    text = run_on_pty({"DISTRAIN_PROGRESS": ""}, size)
    assert "\r" in text.replace("\r\n", "")
    assert re.search(r"epoch 1: 100%\|.*\| 20/20 \[.*loss=0\.05, samples/s=2000\]", text), text
    assert not any(LINE.match(line) for line in text.replace("\r\n", "\n").splitlines())


@pytest.mark.timeout(60)
def test_distrain_progress_0_gives_plain_lines_on_a_terminal() -> None:
    check_plain_lines(run_on_pty({"DISTRAIN_PROGRESS": "0"}))


def test_progress_mode_reads_the_variable_then_the_terminal() -> None:
    pipe = io.StringIO()
    assert progress_mode(pipe, {}) == "lines"
    assert progress_mode(pipe, {"DISTRAIN_PROGRESS": "1"}) == "bar"
    assert progress_mode(pipe, {"DISTRAIN_PROGRESS": "off"}) == "lines"
    with pytest.raises(ConfigError, match="DISTRAIN_PROGRESS='maybe'"):
        progress_mode(pipe, {"DISTRAIN_PROGRESS": "maybe"})


def test_other_ranks_print_nothing() -> None:
    out = io.StringIO()
    with EpochProgress(context(1), total=4, epoch=0, stream=out) as bar:
        for _ in range(4):
            bar.update(loss=1.0)
        bar.write("hello")
    print_config({"a": 1}, context(1), stream=out)
    print_summary(context(1), stream=out, steps=1, seconds=1.0)
    assert out.getvalue() == ""


def test_unknown_total_and_the_last_partial_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTRAIN_PROGRESS", raising=False)
    out = io.StringIO()
    with EpochProgress(context(0), total=None, desc="eval", every=3, stream=out) as bar:
        for step in range(7):
            if step == 4:
                bar.set(acc=0.4)  # shown from now on, without advancing
            bar.update()
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[1] for line in lines] == ["step 3", "step 6", "step 7"]
    assert lines[0].count("|") == 2 and "acc 0.4" in lines[1]
    assert lines[-1].startswith("eval | step 7 | acc 0.4 |")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optim:
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    epochs: int = 3
    optim: Optim = dataclasses.field(default_factory=Optim)
    out_dir: Path = Path("runs/x")


def test_config_table_is_flattened_sorted_and_aligned() -> None:
    assert flatten_config(Config()) == {"epochs": 3, "optim.lr": 0.1,
                                        "optim.betas": (0.9, 0.99), "out_dir": Path("runs/x")}
    table = format_config(Config()).splitlines()
    assert table[0] == "config:"
    assert [row.split()[0] for row in table[1:]] == ["epochs", "optim.betas", "optim.lr",
                                                     "out_dir"]
    value_columns = {len(row) - len(row.split(None, 1)[1]) for row in table[1:]}
    assert value_columns == {len("  optim.betas  ")}
    with pytest.raises(ConfigError, match="config='int'"):
        flatten_config(3)


def test_summary_line_names_steps_time_throughput_metrics_and_places() -> None:
    line = summary_line(steps=300, seconds=42.0, samples=63000,
                        metrics={"train/loss": 0.12345678, "eval/accuracy": 0.95},
                        ckpt_dir="runs/x/ckpt", log_dir="runs/x/tb")
    assert line == ("done: 300 steps in 42.0s, 1500 samples/s | train/loss 0.1235, "
                    "eval/accuracy 0.95 | checkpoints: runs/x/ckpt | "
                    "logs: runs/x/tb (tensorboard --logdir runs/x/tb)")
    assert "\n" not in line
