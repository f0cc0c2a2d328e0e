"""The console on rank 0: a progress bar per epoch, the config table, a one-line end summary.

::

    print_config(cfg, ctx)                                  # aligned table, once at start
    with EpochProgress(ctx, total=len(loader), epoch=epoch) as bar:
        for x, y in loader:
            ...
            bar.update(loss=float(loss), samples_per_s=stats.samples_per_s)
    print_summary(ctx, steps=s, seconds=t, samples=n, metrics=final,
                  ckpt_dir="runs/x/ckpt", log_dir="runs/x/tb")

Bar or lines: a ``tqdm`` bar when stdout is a terminal; plain lines (about ten per epoch)
when it is not (CI, log files, a launcher's pipe) or when ``DISTRAIN_PROGRESS=0``;
``DISTRAIN_PROGRESS=1`` forces the bar. Other ranks print nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from distrain.errors import ConfigError
from distrain.logging.scalars import to_float

if TYPE_CHECKING:
    import torch

    from distrain.context import Context

__all__ = [
    "PROGRESS_ENV",
    "EpochProgress",
    "flatten_config",
    "format_config",
    "format_config_markdown",
    "print_config",
    "print_summary",
    "progress_mode",
    "summary_line",
]

PROGRESS_ENV = "DISTRAIN_PROGRESS"
_OFF = ("0", "false", "off", "no", "lines")
_ON = ("1", "true", "on", "yes", "bar")
LINES_PER_EPOCH = 10
LINES_EVERY_UNKNOWN_TOTAL = 50


def _is_main(ctx: Context | None) -> bool:
    return True if ctx is None else bool(ctx.is_main)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _terminal_size(stream: IO[str]) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return 0, 0
    return size.columns, size.lines


def progress_mode(stream: IO[str] | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``"bar"`` or ``"lines"``: ``DISTRAIN_PROGRESS`` if set, else whether ``stream`` is a TTY."""
    env = os.environ if environ is None else environ
    value = env.get(PROGRESS_ENV, "").strip().lower()
    if value in _OFF:
        return "lines"
    if value in _ON:
        return "bar"
    if value:
        raise ConfigError(PROGRESS_ENV, value, "0 (plain lines) or 1 (progress bar)",
                          f"unset {PROGRESS_ENV} to choose by terminal")
    out = sys.stdout if stream is None else stream
    isatty = getattr(out, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "lines"


class EpochProgress:
    """Progress of one epoch on rank 0: a tqdm bar, or a plain line every ``every`` steps.

    ``total``: steps in the epoch (None if unknown). ``every``: steps between plain lines
    (default: a tenth of the epoch).
    """

    def __init__(
        self,
        ctx: Context | None,
        *,
        total: int | None,
        epoch: int | None = None,
        desc: str | None = None,
        every: int | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        if total is not None and total < 0:
            raise ConfigError("total", total, "None or >= 0 steps", "pass len(loader)")
        if every is not None and every < 1:
            raise ConfigError("every", every, ">= 1 step", "e.g. every=50")
        self.enabled = _is_main(ctx)
        self.total = total
        self.desc = desc if desc is not None else (f"epoch {epoch}" if epoch is not None else "train")
        self.every = every or (max(1, total // LINES_PER_EPOCH) if total else LINES_EVERY_UNKNOWN_TOTAL)
        self.stream = sys.stdout if stream is None else stream
        self.count = 0
        self.mode = progress_mode(self.stream) if self.enabled else "off"
        self._start = time.perf_counter()
        self._last_line = 0
        self._postfix: dict[str, Any] = {}
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            # A terminal that reports a 0x0 size (a bare pty, some CI runners) makes tqdm draw
            # nothing (no width, and row 0 counts as below the screen): use a fixed size then.
            columns, rows = _terminal_size(self.stream)
            self._bar = tqdm(total=total, desc=self.desc, unit="step", file=self.stream,
                             dynamic_ncols=columns > 0, ncols=None if columns > 0 else 100,
                             nrows=None if rows > 0 else 24, leave=True)

    def update(
        self,
        n: int = 1,
        *,
        loss: float | torch.Tensor | None = None,
        samples_per_s: float | None = None,
        **metrics: float | torch.Tensor,
    ) -> None:
        """Advance by ``n`` steps; show the numbers given (see :meth:`set`)."""
        if not self.enabled:
            return
        self.count += n
        self.set(loss=loss, samples_per_s=samples_per_s, **metrics)
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt(v) for k, v in self._postfix.items()}, refresh=False)
            self._bar.update(n)
            return
        due = self.count - self._last_line >= self.every
        if due or (self.total is not None and self.count >= self.total):
            self._print_line()

    def set(
        self,
        *,
        loss: float | torch.Tensor | None = None,
        samples_per_s: float | None = None,
        **metrics: float | torch.Tensor,
    ) -> None:
        """Numbers to show from now on, without advancing (e.g. only at logged steps)."""
        if not self.enabled:
            return
        if loss is not None:
            self._postfix["loss"] = to_float(loss)
        if samples_per_s is not None:
            self._postfix["samples/s"] = float(samples_per_s)
        self._postfix.update({key: to_float(value) for key, value in metrics.items()})

    def _print_line(self) -> None:
        self._last_line = self.count
        if self.total:
            where = f"step {self.count:>{len(str(self.total))}}/{self.total} " \
                    f"({100 * self.count // self.total:>3}%)"
        else:
            where = f"step {self.count}"
        parts = [self.desc, where]
        parts += [f"{key} {_fmt(value)}" for key, value in self._postfix.items()]
        parts.append(f"{time.perf_counter() - self._start:.1f}s")
        print(" | ".join(parts), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A message that does not break the bar (``tqdm.write``); plain print otherwise."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """End the epoch: close the bar, or print the last line if it was not printed."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.count > self._last_line:
            self._print_line()
        self.enabled = False

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -------------------------------------------------------------------- config and summary


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A flat ``{"a.b": value}`` dict from a mapping, dataclass or argparse namespace."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        items: Mapping[str, Any] = {f.name: getattr(config, f.name)
                                    for f in dataclasses.fields(config)}
    elif isinstance(config, argparse.Namespace):
        items = vars(config)
    elif isinstance(config, Mapping):
        items = config
    else:
        raise ConfigError("config", type(config).__name__,
                          "a dict, a dataclass instance or an argparse.Namespace",
                          "pass vars(obj) or a dict of the settings")
    flat: dict[str, Any] = {}
    for key, value in items.items():
        name = f"{prefix}{key}"
        nested = isinstance(value, (Mapping, argparse.Namespace)) or (
            dataclasses.is_dataclass(value) and not isinstance(value, type))
        if nested and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def format_config(config: Any, title: str = "config") -> str:
    """The settings as an aligned two-column table, one per line, sorted by name."""
    flat = flatten_config(config)
    if not flat:
        return f"{title}: (empty)"
    width = max(len(key) for key in flat)
    lines = [f"{title}:"]
    lines += [f"  {key:<{width}}  {_fmt(flat[key])}" for key in sorted(flat)]
    return "\n".join(lines)


def format_config_markdown(config: Any) -> str:
    """The settings as a Markdown table (for ``TBLogger.text``)."""
    flat = flatten_config(config)
    rows = [f"| {key} | `{_fmt(flat[key])}` |" for key in sorted(flat)]
    return "\n".join(["| setting | value |", "|---|---|", *rows])


def print_config(config: Any, ctx: Context | None = None, *, title: str = "config",
                 stream: IO[str] | None = None) -> None:
    """Print the resolved configuration once, on rank 0."""
    if _is_main(ctx):
        print(format_config(config, title), file=sys.stdout if stream is None else stream,
              flush=True)


def summary_line(
    *,
    steps: int,
    seconds: float,
    samples: int | None = None,
    metrics: Mapping[str, float] | None = None,
    ckpt_dir: str | os.PathLike[str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> str:
    """One line: steps, time, throughput, final metrics, where checkpoints and logs are."""
    head = f"done: {steps} steps in {seconds:.1f}s"
    if samples is not None and seconds > 0:
        head += f", {samples / seconds:.0f} samples/s"
    parts = [head]
    if metrics:
        parts.append(", ".join(f"{key} {_fmt(float(value))}" for key, value in metrics.items()))
    if ckpt_dir is not None:
        parts.append(f"checkpoints: {ckpt_dir}")
    if log_dir is not None:
        parts.append(f"logs: {log_dir} (tensorboard --logdir {log_dir})")
    return " | ".join(parts)


def print_summary(ctx: Context | None = None, *, stream: IO[str] | None = None,
                  **fields: Any) -> None:
    """Print :func:`summary_line` on rank 0 (same keyword arguments)."""
    if _is_main(ctx):
        print(summary_line(**fields), file=sys.stdout if stream is None else stream, flush=True)
