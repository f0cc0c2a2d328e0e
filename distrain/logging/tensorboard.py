"""TensorBoard logs from a distributed run: rank 0 writes, every other rank is a silent no-op.

::

    step = ckpt.load_latest(model=model, optimizer=opt) or 0   # 0 on a fresh start
    tb = TBLogger("runs/x/tb", ctx, purge_step=step + 1)       # the first step this run logs
    tb.config(cfg)                                             # Text tab: the resolved config
    tb.scalars(train_scalars(ctx, loss=loss, ...), step)       # see metrics.py
    tb.hparams(cfg, {"hparam/accuracy": acc})                  # HParams tab, at the end
    tb.close()                                                 # or: with TBLogger(...) as tb:

Only global rank 0 creates a ``tensorboardX.SummaryWriter``; on other ranks no file or
directory is created and every method returns at once, so the same code runs on all ranks.

Durability. ``tensorboardX.SummaryWriter.flush()`` does not drain its event queue: points added
just before it are often not on disk after it returns (TensorBoard's reader misses them
right after ``flush()``). Here events are written to the event file
synchronously and ``flush()`` really flushes. Flushes happen every ``flush_secs`` (a daemon
thread), at ``close()``, at :func:`distrain.ddp.cleanup`, at interpreter exit (also after an
uncaught exception) and on SIGTERM (what the launcher sends the surviving ranks when another
rank fails). Only SIGKILL loses what was logged since the last flush.

Resume: ``purge_step`` is the first step this run logs. TensorBoard's reader drops every point
at or after it written by earlier runs into the same directory, so the step axis continues with
no duplicates and nothing out of order.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from distrain.ckpt.remote import is_url
from distrain.errors import ConfigError
from distrain.group import resolve
from distrain.logging.perf import PerfScalars
from distrain.logging.scalars import to_float
from distrain.logging.sink import Sink

if TYPE_CHECKING:
    import torch

    from distrain.context import Context

__all__ = ["DEFAULT_FLUSH_SECS", "HPARAMS_SUBDIR", "TBLogger", "has_event_files", "to_float"]

log = logging.getLogger("distrain")
DEFAULT_FLUSH_SECS = 10.0
HPARAMS_SUBDIR = "hparams"  # the hparams session lives in LOG_DIR/hparams, as tensorboardX does


def has_event_files(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` holds TensorBoard event files (not looking into subdirectories)."""
    path = Path(directory)
    return path.is_dir() and any(path.glob("*tfevents*"))


def _unique_suffix() -> str:
    # tensorboardX names files events.out.tfevents.<seconds>.<host>: two writers in one second
    # would share (and truncate) one file. A nanosecond suffix keeps names unique and sorted in
    # creation order, which is the order TensorBoard's reader reads them in.
    return f".{time.time_ns():020d}.{os.getpid()}"


def _cpu(value: Any) -> Any:
    """A tensor detached and on the CPU (tensorboardX converts it); anything else as given."""
    detach = getattr(value, "detach", None)
    return detach().cpu() if callable(detach) else value


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # None, paths, devices, tuples: shown as text in the HParams dashboard


class TBLogger:
    """A tensorboardX ``SummaryWriter`` on global rank 0; the same API as a no-op elsewhere.

    Args:
        log_dir: The directory of the event files.
        ctx: The worker's context; the current one by default.
        purge_step: On resume, the first step this run logs (points the previous run logged at
            or after it are dropped by TensorBoard).
        flush_secs: How often buffered points are written out.

    Raises:
        ConfigError: An empty ``log_dir``, a negative ``purge_step`` or a non-positive
            ``flush_secs``.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        ctx: Context | None = None,
        *,
        purge_step: int | None = None,
        flush_secs: float = DEFAULT_FLUSH_SECS,
    ) -> None:
        if not str(log_dir):
            raise ConfigError("log_dir", log_dir, "a directory path", 'e.g. "runs/exp1/tb"')
        if isinstance(purge_step, bool) or (
            purge_step is not None and (not isinstance(purge_step, int) or purge_step < 0)
        ):
            raise ConfigError(
                "purge_step", purge_step, "None or the first step (>= 0) this run logs",
                "pass the restored step + 1 (ckpt.load_latest(...) or 0, plus one)",
            )
        if not isinstance(flush_secs, (int, float)) or flush_secs <= 0:
            raise ConfigError("flush_secs", flush_secs, "a positive number of seconds", "e.g. 10")
        self.log_dir = Path(log_dir)
        # An object-store URL (s3://bucket/run/tb) goes to tensorboardX as it is: its own S3
        # writer uploads the events (Path() would turn it into a local "s3:/..." directory).
        self._url = str(log_dir).rstrip("/") if is_url(str(log_dir)) else None
        self.enabled = bool(resolve(ctx).is_main)
        self.purge_step = purge_step
        self.flush_secs = float(flush_secs)
        self._sink: Sink | None = None
        self._perf = PerfScalars()  # the launcher's straggler figures, logged beside the user's
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if self.enabled:
            self._open()

    # ------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        from tensorboardX import SummaryWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        from distrain.group import on_cleanup

        if self.purge_step is None and self._url is None and has_event_files(self.log_dir):
            log.warning(
                "distrain: %s already holds TensorBoard events; when resuming pass "
                "TBLogger(..., purge_step=FIRST_STEP) or TensorBoard shows duplicate points",
                self.log_dir,
            )
        writer = SummaryWriter(
            logdir=self._url or str(self.log_dir), flush_secs=max(1, round(self.flush_secs)),
            filename_suffix=_unique_suffix(),
        )
        sink = Sink(writer)
        if self.purge_step is not None:
            # What SummaryWriter(purge_step=...) writes, but through the synchronous path so the
            # marker lands before any point of this run.
            writer.file_writer.add_event(Event(step=self.purge_step, file_version="brain.Event:2"))
            writer.file_writer.add_event(
                Event(step=self.purge_step, session_log=SessionLog(status=SessionLog.START))
            )
        sink.flush()
        sink.start_flushing(self.flush_secs)
        self._sink = sink
        # Closed when the logger is closed, garbage collected, or at interpreter exit (also
        # after an uncaught exception); flushed at ddp.cleanup() and on SIGTERM.
        self._finalizer = weakref.finalize(self, sink.close)
        on_cleanup(sink.flush)
        sink.install_sigterm()

    def flush(self) -> None:
        """Write every point logged so far to the event file (visible to TensorBoard now)."""
        if self._sink is not None:
            self._sink.flush()

    def close(self) -> None:
        """Flush and close the event file. Idempotent; later calls on the logger do nothing."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> TBLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def scalar(self, tag: str, value: float | torch.Tensor, step: int) -> None:
        """One point of the curve ``tag``. ``value`` may be a number or a one-element tensor."""
        if self._sink is not None:
            with self._sink.writing() as writer:
                if writer is not None:
                    writer.add_scalar(tag, to_float(value), int(step))
                    self._add_perf(writer, step)

    def _add_perf(self, writer: Any, step: int) -> None:
        for tag, value in self._perf.new().items():
            writer.add_scalar(tag, value, int(step))

    def scalars(self, values: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Several curves at one step: ``{"train/loss": 0.3, "train/lr": 0.1}``."""
        if self._sink is not None:
            with self._sink.writing() as writer:
                if writer is not None:
                    for tag, value in values.items():
                        writer.add_scalar(tag, to_float(value), int(step))
                    self._add_perf(writer, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Markdown text (TensorBoard's Text tab), e.g. the resolved config."""
        if self._sink is not None:
            with self._sink.writing() as writer:
                if writer is not None:
                    writer.add_text(tag, text, int(step))

    def histogram(self, tag: str, values: Any, step: int, bins: str = "tensorflow") -> None:
        """The distribution of a tensor or array (weights, gradients)."""
        if self._sink is None:
            return
        if hasattr(values, "detach"):
            values = values.detach().float().cpu().numpy()
        with self._sink.writing() as writer:
            if writer is not None:
                writer.add_histogram(tag, values, int(step), bins=bins)

    def image(self, tag: str, image: Any, step: int, *, dataformats: str = "CHW") -> None:
        """One image (a tensor or array, values in [0, 1] for floats) in the Images tab."""
        if self._sink is None:
            return
        with self._sink.writing() as writer:
            if writer is not None:
                writer.add_image(tag, _cpu(image), int(step), dataformats=dataformats)

    def images(self, tag: str, images: Any, step: int, *, dataformats: str = "NCHW") -> None:
        """A batch of images as one grid, e.g. ``tb.images("inputs", batch[:16], step)``."""
        if self._sink is None:
            return
        with self._sink.writing() as writer:
            if writer is not None:
                writer.add_images(tag, _cpu(images), int(step), dataformats=dataformats)

    def figure(self, tag: str, figure: Any, step: int, *, close: bool = True) -> None:
        """A matplotlib figure, rendered to an image (closed afterwards unless ``close=False``)."""
        if self._sink is None:
            return
        with self._sink.writing() as writer:
            if writer is not None:
                writer.add_figure(tag, figure, int(step), close=close)

    def embedding(
        self,
        features: Any,
        *,
        metadata: Any = None,
        label_img: Any = None,
        step: int = 0,
        tag: str = "default",
        metadata_header: Any = None,
    ) -> None:
        """Points for TensorBoard's Projector tab: ``features`` (N x D), one ``metadata`` label
        per point (or rows with ``metadata_header``), ``label_img`` (N x C x H x W) for the
        sprite. Written under ``LOG_DIR/<step>/<tag>`` with ``projector_config.pbtxt``."""
        if self._sink is None:
            return
        if hasattr(metadata, "tolist"):
            metadata = metadata.tolist()
        with self._sink.writing() as writer:
            if writer is not None:
                with warnings.catch_warnings():  # "embedding dir exists": a resumed run rewrites it
                    warnings.simplefilter("ignore")
                    writer.add_embedding(_cpu(features), metadata=metadata,
                                         label_img=None if label_img is None else _cpu(label_img),
                                         global_step=int(step), tag=tag, metadata_header=metadata_header)

    @property
    def writer(self) -> Any:
        """The underlying ``tensorboardX.SummaryWriter`` on rank 0 while open; None on other ranks
        and after :meth:`close`. For calls TBLogger lacks (``writer.add_pr_curve(...)``)."""
        return self._sink.writer if self._sink is not None and self._sink.open else None

    def config(self, config: Any, *, tag: str = "config") -> None:
        """The resolved run configuration (dict, dataclass, Namespace) as a table in the Text tab.

        Written at step ``purge_step`` (0 on a fresh run), so a resumed run adds its own.
        """
        if self._sink is None:
            return
        from distrain.logging.progress import format_config_markdown

        self.text(tag, format_config_markdown(config), self.purge_step or 0)

    def hparams(
        self,
        hparams: Any,
        metrics: Mapping[str, float | torch.Tensor],
        *,
        step: int | None = None,
    ) -> None:
        """The run's configuration and final metrics for TensorBoard's HParams tab.

        ``hparams``: a dict, dataclass or Namespace (nested ones are flattened to ``a.b``).
        Written as one session in ``LOG_DIR/hparams`` (replacing an earlier one, e.g. of the run
        before a resume). Name metrics apart from the training curves, e.g. ``hparam/accuracy``.
        Values that are not bool/int/float/str are shown as text.
        """
        if self._sink is None:
            return
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams as hparams_summary

        from distrain.logging.progress import flatten_config

        clean = {key: _hparam_value(value) for key, value in flatten_config(hparams).items()}
        values = {str(key): to_float(value) for key, value in metrics.items()}
        experiment, start, end = hparams_summary(clean, values)
        target = self.log_dir / HPARAMS_SUBDIR
        with self._sink.writing() as writer:
            if writer is None:
                return
            for old in target.glob("*tfevents*") if self._url is None else ():
                old.unlink()
            where = f"{self._url}/{HPARAMS_SUBDIR}" if self._url else str(target)
            with SummaryWriter(logdir=where, filename_suffix=_unique_suffix()) as session:
                for summary in (experiment, start, end):
                    session.file_writer.add_summary(summary)
                for tag, value in values.items():
                    session.add_scalar(tag, value, step)

    def graph(self, model: torch.nn.Module, example_input: Any) -> bool:
        """The model's traced graph (TensorBoard's Graphs tab). True when it was written.

        The DDP wrapper is removed first and the model is traced in eval mode, so tracing on
        rank 0 alone neither issues collectives nor touches BatchNorm statistics. A sharded
        (FSDP) model is skipped: its forward would wait for the other ranks' shards. A model
        that cannot be traced is reported as a warning, not an error.
        """
        if self._sink is None:
            return False
        from distrain.wrapping import unwrap

        module = unwrap(model)
        if any(type(p).__name__ == "DTensor" for p in module.parameters()):
            log.warning("distrain: not tracing the sharded (FSDP) %s for TensorBoard: its "
                        "forward needs every rank", type(module).__name__)
            return False
        was_training = module.training
        module.eval()
        try:
            with self._sink.writing() as writer:
                if writer is None:
                    return False
                with warnings.catch_warnings():  # jit.trace's deprecation notice, every call
                    warnings.simplefilter("ignore", FutureWarning)
                    writer.add_graph(module, example_input)
        except Exception as error:  # diagnostics only: never stop training for a graph
            log.warning("distrain: could not trace %s for TensorBoard: %s",
                        type(module).__name__, error)
            return False
        finally:
            module.train(was_training)
        return True
