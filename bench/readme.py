"""Write bench/README.md's "Latest run" block from bench/results.json (``make bench`` does it).

    python bench/readme.py                      # bench/results.json -> bench/README.md
    python bench/readme.py --results other.json --readme /tmp/README.md

The block between the two markers is replaced; everything else in the README (what the numbers
mean, older measurements) is left as written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BEGIN = "<!-- latest-run:begin (written by bench/readme.py from bench/results.json) -->"
END = "<!-- latest-run:end -->"
REPO = Path(__file__).resolve().parents[1]


def tables_in(text: str) -> list[str]:
    """The tables ``bench.common.table`` printed in ``text``: a title line, then ``|`` rows."""
    lines = text.splitlines()
    found: list[str] = []
    index = 0
    while index < len(lines):
        starts_table = (index + 2 < len(lines) and not lines[index].startswith("|")
                        and lines[index + 1].startswith("| ") and lines[index + 2].startswith("|-"))
        if not starts_table:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        found.append("\n".join(lines[index:end]))
        index = end
    return found


def render(report: dict[str, Any]) -> str:
    """The markdown block for one ``run_all`` report."""
    head = (f"Latest `{report.get('command', 'python bench/run_all.py')}` "
            f"({report.get('started', '?')}; {report.get('machine', '?')}; "
            f"{report.get('load_at_start', '?')} at the start, {report.get('load_at_end', '?')} at the end):")
    parts = [BEGIN, head]
    for name, tables in report.get("tables", {}).items():
        seconds = report.get("seconds", {}).get(name)
        parts.append(f"### {name}" + (f" ({seconds / 60:.1f} min)" if seconds is not None else ""))
        for table in tables:
            title, _, rows = table.partition("\n")
            parts.append(f"**{title.strip()}**\n\n{rows}")
    for name, error in report.get("errors", {}).items():
        parts.append(f"### {name}: failed\n\n`{error.splitlines()[0] if error else ''}`")
    parts.append(END)
    return "\n\n".join(parts) + "\n"


def replace_block(readme: str, block: str) -> str:
    """``readme`` with its latest-run block replaced (appended when it has none)."""
    if BEGIN in readme and END in readme:
        before, _, rest = readme.partition(BEGIN)
        _, _, after = rest.partition(END)
        return before + block.rstrip("\n") + after
    return readme.rstrip("\n") + "\n\n## Latest run\n\n" + block


def write(results: Path, readme: Path) -> None:
    report = json.loads(results.read_text())
    readme.write_text(replace_block(readme.read_text(), render(report)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--readme", type=Path, default=REPO / "bench" / "README.md")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        print(f"bench/readme.py: --results {args.results}: no such file; run `make bench` first",
              file=sys.stderr)
        return 2
    write(args.results, args.readme)
    print(f"bench/readme.py: {args.readme} updated from {args.results}")
    return 0


class Tee:
    """A stdout that also keeps what was written (run_all reads the tables back from it)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def text(self) -> str:
        return "".join(self.parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


if __name__ == "__main__":
    sys.exit(main())
