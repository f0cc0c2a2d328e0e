"""The README's tour runs as written, and every link in README and docs/ points at a file."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.helpers import PYTHON, REPO, assert_ok, run_cmd

README = REPO / "README.md"


def tour_commands() -> list[list[str]]:
    """The first ```bash block under '## 30-second tour', one command a line."""
    section = README.read_text().split("## 30-second tour", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


@pytest.mark.timeout(420)
def test_the_tour_commands_run_as_written(tmp_path: Path) -> None:
    commands = tour_commands()
    assert [c[:2] for c in commands] == [["distrain", "launch"], ["distrain", "launch"],
                                         ["distrain", "ckpt"], ["distrain", "report"]]
    outputs = []
    for command in commands:
        # Run from a copy of the layout the README assumes: examples/ beside a fresh runs/.
        argv = [str(REPO / a) if a.startswith("examples/") else a for a in command[1:]]
        result = run_cmd([PYTHON, "-m", "distrain", *argv], cwd=tmp_path, timeout=240)
        assert_ok(result)
        outputs.append(result.stdout + result.stderr)
    assert "epoch 1: step 46" in outputs[0] and "epoch 2" not in outputs[0]
    assert "epoch 2: step 69" in outputs[1] and "epoch 0" not in outputs[1]  # resumed, third epoch only
    assert re.search(r"^\*\s+69\s", outputs[2], re.MULTILINE), outputs[2]
    assert (tmp_path / "runs" / "tour" / "report.png").stat().st_size > 0


def test_every_relative_link_in_the_docs_exists() -> None:
    pages = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
