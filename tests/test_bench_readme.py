"""bench/README.md's latest-run block comes from bench/results.json (bench/readme.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from bench.common import table
from bench.readme import BEGIN, END, Tee, main, render, replace_block, tables_in


def test_tables_printed_by_a_section_are_found_between_other_output() -> None:
    sink = io.StringIO()
    printed = Tee(sink)
    print("starting 5 launches...", file=printed)
    print(table("Async vs blocking save", ["what", "ratio"], [["stall", 0.08], ["segment", 0.41]]),
          file=printed)
    print("| not a table: no title and no rule", file=printed)
    print(table("Throughput", ["MB/s", "vs dd"], [[1369, 1.13]]), file=printed)
    assert sink.getvalue() == printed.text()
    found = tables_in(printed.text())
    assert [t.splitlines()[0] for t in found] == ["Async vs blocking save", "Throughput"]
    assert "| segment | 0.410 |" in found[0] and "| 1369 | 1.130 |" in found[1]


def test_the_block_is_replaced_in_place_and_the_rest_of_the_readme_kept(tmp_path: Path) -> None:
    report = {"command": "python bench/run_all.py --only ckpt", "started": "2026-12-01T04:00:00",
              "machine": "2 cores", "load_at_start": "load 0.3", "load_at_end": "load 1.1",
              "seconds": {"ckpt": 90.0}, "errors": {"ray": "RuntimeError: no cluster\ntrace"},
              "tables": {"ckpt": [table("Stall", ["async/blocking"], [[0.08]])]}}
    block = render(report)
    assert block.startswith(BEGIN) and block.rstrip().endswith(END)
    assert "### ckpt (1.5 min)" in block and "**Stall**" in block and "| 0.080" in block
    assert "### ray: failed" in block and "RuntimeError: no cluster" in block and "trace" not in block
    readme = f"# Benchmarks\n\nintro\n\n{BEGIN}\nold numbers\n{END}\n\n## What the numbers mean\n"
    updated = replace_block(readme, block)
    assert "old numbers" not in updated and "0.080" in updated
    assert updated.startswith("# Benchmarks\n\nintro\n\n") and updated.endswith("## What the numbers mean\n")
    results, target = tmp_path / "results.json", tmp_path / "README.md"
    results.write_text(json.dumps(report))
    target.write_text("# Benchmarks\n")
    assert main(["--results", str(results), "--readme", str(target)]) == 0
    assert target.read_text().count(BEGIN) == 1
    assert main(["--results", str(tmp_path / "missing.json"), "--readme", str(target)]) == 2
