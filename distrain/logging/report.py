"""``distrain report RUN_DIR [--out report.png]``: a run's TensorBoard curves as one PNG + a table.

Reads every directory under ``RUN_DIR`` that holds event files (TensorBoard's own reader,
``EventAccumulator``, so resumed runs show the purged, de-duplicated step axis TensorBoard
shows), draws loss, accuracy and throughput curves side by side with matplotlib's Agg backend
(no display needed), and prints the final value of every scalar as a table. The hparams session
(``LOG_DIR/hparams``) is left out of the curves. Bad input exits 2 with one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distrain.errors import ConfigError
from distrain.launch_args import OneLineParser
from distrain.logging.tensorboard import HPARAMS_SUBDIR

__all__ = ["PANELS", "Curve", "find_runs", "format_table", "main", "read_scalars", "render"]

EXIT_USAGE = 2
# (panel title, y label, what a tag's last path component must contain to be drawn there)
PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "loss", ("loss",)),
    ("accuracy", "accuracy", ("acc",)),
    ("throughput", "samples/s", ("samples_per_s", "throughput")),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Curve:
    """One scalar tag of one run, in step order."""

    run: str
    tag: str
    steps: tuple[int, ...]
    values: tuple[float, ...]


def find_runs(run_dir: Path) -> list[Path]:
    """Directories under ``run_dir`` (itself included) holding event files, hparams left out."""
    runs = []
    for root, dirs, files in os.walk(run_dir):
        dirs.sort()
        if Path(root).name == HPARAMS_SUBDIR and Path(root) != run_dir:
            continue
        if any("tfevents" in name for name in files):
            runs.append(Path(root))
    return runs


def read_scalars(run_dir: Path) -> list[Curve]:
    """Every scalar curve under ``run_dir``, read with TensorBoard's ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    curves = []
    for path in find_runs(run_dir):
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0: keep all
        accumulator.Reload()
        name = path.relative_to(run_dir).as_posix() if path != run_dir else "."
        for tag in sorted(accumulator.Tags().get("scalars", [])):
            events = accumulator.Scalars(tag)
            curves.append(Curve(run=name, tag=tag, steps=tuple(e.step for e in events),
                                values=tuple(float(e.value) for e in events)))
    return curves


def _panel_of(tag: str) -> int | None:
    leaf = tag.rsplit("/", 1)[-1].lower()
    for index, (_, _, needles) in enumerate(PANELS):
        if any(needle in leaf for needle in needles):
            return index
    return None


def render(curves: Sequence[Curve], out: Path, title: str) -> None:
    """Draw the loss, accuracy and throughput panels to the PNG ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(PANELS))
    several_runs = len({curve.run for curve in curves}) > 1
    for index, (panel, ylabel, _) in enumerate(PANELS):
        ax = axes[index]
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        drawn = [c for c in curves if _panel_of(c.tag) == index and c.steps]
        for curve in drawn:
            label = f"{curve.run}: {curve.tag}" if several_runs else curve.tag
            marker = "o" if len(curve.steps) < 30 else None
            ax.plot(curve.steps, curve.values, label=label, marker=marker, markersize=3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {panel} curves", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    figure.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100, format="png")


def format_table(curves: Sequence[Curve]) -> str:
    """Final value per curve, aligned: run (when several), tag, last step, value, min, max."""
    several_runs = len({curve.run for curve in curves}) > 1
    header = (["run"] if several_runs else []) + ["tag", "step", "final", "min", "max", "points"]
    rows = []
    for curve in curves:
        if not curve.steps:
            continue
        row = [curve.run] if several_runs else []
        row += [curve.tag, str(curve.steps[-1]), f"{curve.values[-1]:.6g}",
                f"{min(curve.values):.6g}", f"{max(curve.values):.6g}", str(len(curve.steps))]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    text_columns = 2 if several_runs else 1  # left-align names, right-align numbers

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < text_columns else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


def _parse(argv: Sequence[str]) -> tuple[Path, Path]:
    parser = OneLineParser(
        prog="distrain report",
        description="Draw a run's loss, accuracy and throughput curves (TensorBoard event "
                    "files) to a PNG and print the final values.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="the run's directory, or its TensorBoard log directory")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/report.png)")
    args = parser.parse_args(list(argv))
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError("RUN_DIR", args.run_dir, "an existing directory",
                          "pass the run's directory, e.g. distrain report runs/exp1")
    out = Path(args.out) if args.out else run_dir / "report.png"
    if out.suffix.lower() != ".png":
        raise ConfigError("--out", args.out, "a .png file name", "e.g. --out report.png")
    if out.is_dir():
        raise ConfigError("--out", args.out, "a file, not a directory", "e.g. --out report.png")
    return run_dir, out


def main(argv: Sequence[str]) -> int:
    """Entry point of ``distrain report``; returns the exit code."""
    try:
        run_dir, out = _parse(argv)
        if not find_runs(run_dir):
            raise ConfigError("RUN_DIR", str(run_dir), "a directory with TensorBoard event "
                              "files (events.out.tfevents.*) in it or below",
                              "point at the run's log directory (where TBLogger wrote)")
        curves = [c for c in read_scalars(run_dir) if c.steps]
        if not curves:
            raise ConfigError("RUN_DIR", str(run_dir), "event files with scalar points",
                              "log with TBLogger.scalar/scalars, then flush or close it")
    except ConfigError as error:
        print(f"distrain report: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    render(curves, out, title=str(run_dir))
    print(format_table(curves))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
