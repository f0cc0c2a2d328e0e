"""``distrain report``: a real PNG and a table whose numbers are the ones in the event files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from distrain.ddp import Context
from distrain.logging import TBLogger
from distrain.logging import metrics as m
from distrain.logging.report import main
from tests.helpers import PYTHON, distrain, run_cmd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(log_dir: Path) -> None:
    ctx = Context(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                  device=torch.device("cpu"), backend=None, is_main=True)
    with TBLogger(log_dir, ctx) as tb:
        tb.config({"lr": 0.1})
        for step in range(1, 31):
            tb.scalars({m.LOSS: 2.0 * math.exp(-step / 10) + 0.01 * math.sin(step),
                        m.SAMPLES_PER_S: 1000.0 + 7.3 * step, m.LR: 0.1}, step)
            if step % 10 == 0:
                tb.scalars({m.EVAL_ACCURACY: 0.5 + step / 70.0, m.EVAL_LOSS: 1.5 / step}, step)
        tb.hparams({"lr": 0.1}, {"hparam/accuracy": 0.93})


def table_rows(stdout: str) -> dict[str, list[str]]:
    return {cells[0]: cells for cells in (line.split() for line in stdout.splitlines())
            if cells and "/" in cells[0]}


@pytest.mark.timeout(60)
def test_report_png_and_table_match_the_events(tmp_path: Path) -> None:
    write_run(tmp_path / "tb")
    (tmp_path / "ckpt").mkdir()  # a run directory holds more than logs
    out = tmp_path / "plots" / "report.png"
    missing = distrain("report", str(tmp_path), "--out", str(out), timeout=60)
    assert missing.returncode == 2 and "a file in an existing directory" in missing.stderr, missing.stderr
    out.parent.mkdir()
    result = distrain("report", str(tmp_path), "--out", str(out), timeout=60)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 20_000
    height, width, _ = imread(str(out)).shape
    assert (height, width) == (450, 1500)

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={SCALARS: 0})
    acc.Reload()
    rows = table_rows(result.stdout)
    assert set(rows) == set(acc.Tags()["scalars"])  # the hparams session is not a curve
    for tag, cells in rows.items():
        events = acc.Scalars(tag)
        values = [e.value for e in events]
        assert cells == [tag, str(events[-1].step), f"{values[-1]:.6g}", f"{min(values):.6g}",
                         f"{max(values):.6g}", str(len(events))]
    assert rows[m.EVAL_ACCURACY][1:3] == ["30", f"{0.5 + 30 / 70.0:.6g}"]
    assert result.stdout.rstrip().endswith(
        f"report: {out} (loss: eval/loss, train/loss; accuracy: eval/accuracy; "
        "throughput: perf/samples_per_s)")


def test_report_defaults_to_run_dir_png_and_labels_several_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path / "a" / "tb")
    write_run(tmp_path / "b" / "tb")
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG_MAGIC
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["run", "tag"]
    assert {line.split()[0] for line in lines[1:-1]} == {"a/tb", "b/tb"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "RUN_DIR="),
        (["{empty}"], "TensorBoard event files"),
        (["{run}", "--out", "{run}/report.txt"], "--out="),
        (["{run}", "--out", "{run}"], "--out="),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    write_run(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    places = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "run": tmp_path / "run"}
    assert main([a.format(**places) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distrain report: error: ") and message in err[0]


def test_event_files_without_scalars_exit_2(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ctx = Context(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                  device=torch.device("cpu"), backend=None, is_main=True)
    with TBLogger(tmp_path, ctx) as tb:
        tb.text("note", "only text")
    assert main([str(tmp_path)]) == 2
    assert "scalar points" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_cli_bad_input_is_one_line_without_traceback(tmp_path: Path) -> None:
    for argv in (["-m", "distrain", "report", str(tmp_path / "nope")],
                 ["-m", "distrain", "report", str(tmp_path), "--bogus"],
                 ["-m", "distrain.logging.report"]):
        result = run_cmd([PYTHON, *argv], timeout=60)
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
