"""``distrain report RUN_DIR [--out report.png] [--tags ...]``: a run's curves as one PNG + a table.

Reads every directory under ``RUN_DIR`` that holds event files (TensorBoard's own reader,
``EventAccumulator``, so resumed runs show the purged, de-duplicated step axis TensorBoard
shows), draws loss, accuracy and throughput curves side by side with matplotlib's Agg backend
(no display needed), and prints the final value of every scalar as a table. A tag goes to a panel
when its name contains the panel's word, in any case (``Loss/train``, ``eval/accuracy``); ``--tags``
draws one panel per pattern instead. Each event file after a run's first is a restart or resume:
its first step is marked with a dashed line. The hparams session (``LOG_DIR/hparams``) is left out
of the curves. Bad input exits 2 with one line.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from distrain.errors import ConfigError, OneLineParser, usage_error
from distrain.logging.tensorboard import HPARAMS_SUBDIR

__all__ = ["PANELS", "Curve", "find_runs", "format_table", "main", "read_scalars", "render", "resume_steps",
           "tag_panels"]

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
    resumed_at: tuple[int, ...] = ()  # first step of every later event file (restart or resume)


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
        with quiet_reader():
            accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0: keep all
            accumulator.Reload()
            resumed = resume_steps(path)
        name = path.relative_to(run_dir).as_posix() if path != run_dir else "."
        for tag in sorted(accumulator.Tags().get("scalars", [])):
            events = accumulator.Scalars(tag)
            curves.append(Curve(run=name, tag=tag, steps=tuple(e.step for e in events),
                                values=tuple(float(e.value) for e in events), resumed_at=resumed))
    return curves


@contextlib.contextmanager
def quiet_reader() -> Iterator[None]:
    """TensorBoard's reader warns about what a resumed run normally has (several graphs, purged
    steps): keep those off the report's output."""
    logger = logging.getLogger("tensorboard")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def resume_steps(path: Path) -> tuple[int, ...]:
    """The first scalar step of each event file after the first (each process writes its own)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(p for p in path.iterdir() if "tfevents" in p.name)
    firsts = []
    for file in files[1:]:
        for event in EventFileLoader(str(file)).Load():
            if event.HasField("summary") and event.summary.value:
                firsts.append(int(event.step))
                break
    return tuple(sorted(set(firsts)))


Panels = Sequence[tuple[str, str, Sequence[str]]]


def _matches(tag: str, pattern: str) -> bool:
    tag, pattern = tag.lower(), pattern.lower()
    return fnmatch.fnmatchcase(tag, pattern) if any(c in pattern for c in "*?[") else pattern in tag


def _panel_of(tag: str, panels: Panels = PANELS) -> int | None:
    """The panel a tag is drawn in: its last path component decides first, then the whole tag."""
    for text in (tag.rsplit("/", 1)[-1], tag):
        for index, (_, _, needles) in enumerate(panels):
            if any(_matches(text, needle) for needle in needles):
                return index
    return None


def tag_panels(patterns: Sequence[str]) -> Panels:
    """One panel per ``--tags`` pattern (a substring, or a glob with * ? [])."""
    return tuple((pattern, pattern, (pattern,)) for pattern in patterns)


def render(curves: Sequence[Curve], out: Path, title: str, panels: Panels = PANELS) -> None:
    """Draw one panel per entry of ``panels`` (loss, accuracy, throughput by default) to ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(panels), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    several_runs = len({curve.run for curve in curves}) > 1
    for index, (panel, ylabel, _) in enumerate(panels):
        ax = axes[index]
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        drawn = [c for c in curves if _panel_of(c.tag, panels) == index and c.steps]
        for curve in drawn:
            label = f"{curve.run}: {curve.tag}" if several_runs else curve.tag
            marker = "o" if len(curve.steps) < 30 else None
            ax.plot(curve.steps, curve.values, label=label, marker=marker, markersize=3)
        for step in sorted({step for curve in drawn for step in curve.resumed_at}):
            ax.axvline(step, color="gray", linestyle="--", linewidth=1)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {panel} curves", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    figure.suptitle(title)
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


def _parse(argv: Sequence[str]) -> tuple[Path, Path, Panels]:
    parser = OneLineParser(
        prog="distrain report",
        description="Draw a run's curves (TensorBoard event files) to a PNG and print the final value "
                    "of every scalar. By default three panels: loss (tags containing 'loss'), accuracy "
                    "('acc') and throughput ('samples_per_s', 'throughput'), matched in any case, so "
                    "Loss/train and Accuracy/test are drawn. Dashed lines mark the steps where a run "
                    "restarted or resumed.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="the run's directory, or its TensorBoard log directory")
    parser.add_argument("--out", default=None,
                        help="PNG to write, in an existing directory (default RUN_DIR/report.png)")
    parser.add_argument("--tags", nargs="+", default=None, metavar="PATTERN",
                        help="one panel per pattern instead: a substring or glob of tag names, any "
                             "case, e.g. --tags loss 'eval/*' lr")
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
    if not out.parent.is_dir():
        raise ConfigError("--out", args.out, "a file in an existing directory",
                          f"create {out.parent} first, or pick another path")
    return run_dir, out, tag_panels(args.tags) if args.tags else PANELS


def main(argv: Sequence[str]) -> int:
    """Entry point of ``distrain report``; returns the exit code."""
    try:
        run_dir, out, panels = _parse(argv)
        if not find_runs(run_dir):
            raise ConfigError("RUN_DIR", str(run_dir), "a directory with TensorBoard event "
                              "files (events.out.tfevents.*) in it or below",
                              "point at the run's log directory (where TBLogger wrote)")
        curves = [c for c in read_scalars(run_dir) if c.steps]
        if not curves:
            raise ConfigError("RUN_DIR", str(run_dir), "event files with scalar points",
                              "log with TBLogger.scalar/scalars, then flush or close it")
        if panels is not PANELS and not any(_panel_of(c.tag, panels) is not None for c in curves):
            raise ConfigError("--tags", " ".join(p for p, _, _ in panels), "patterns matching some tag",
                              f"the run has {', '.join(sorted({c.tag for c in curves})[:8])}")
    except ConfigError as error:
        return usage_error("distrain report", error)
    render(curves, out, title=str(run_dir), panels=panels)
    print(format_table(curves))
    print(f"report: {out} ({describe_panels(curves, panels)})")
    return 0


def describe_panels(curves: Sequence[Curve], panels: Panels = PANELS) -> str:
    """What each panel shows and where runs restarted: ``loss: Loss/train; accuracy: none``."""
    parts = []
    for index, (panel, _, _) in enumerate(panels):
        tags = sorted({c.tag for c in curves if _panel_of(c.tag, panels) == index})
        parts.append(f"{panel}: {', '.join(tags) or 'none'}")
    resumed = sorted({step for c in curves for step in c.resumed_at})
    if resumed:
        parts.append(f"restarted or resumed at step {', '.join(map(str, resumed))}")
    return "; ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
