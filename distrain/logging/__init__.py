"""Logs people can look at: rank-0 TensorBoard, a progress bar, run reports.

* :class:`TBLogger` (``tensorboard.py``): tensorboardX on rank 0, a no-op elsewhere.
* ``metrics.py``: the standard set (loss mean over ranks, lr, samples/s, step time, data-wait
  fraction, grad norm, memory, eval accuracy) -> ``{tag: value}`` for ``TBLogger.scalars``.
* ``progress.py``: a tqdm bar (plain lines off a terminal), the config table, the end summary.
* ``report.py``: ``distrain report RUN_DIR`` draws the curves to a PNG.

These modules import torch, tensorboardX, tqdm and matplotlib only when used, so
``import distrain.logging`` (and ``distrain report``) stay light; the fast-start server imports
the two a training script needs up front (``DISTRAIN_PRELOAD``, read by
``distrain/launchers/preload_guard.py``).
"""

from distrain.logging.metrics import (
    StepStats,
    StepTimer,
    eval_scalars,
    grad_norm,
    memory_mb,
    reduce_max,
    train_scalars,
)
from distrain.logging.progress import (
    EpochProgress,
    flatten_config,
    format_config,
    format_config_markdown,
    print_config,
    print_summary,
    progress_mode,
    summary_line,
)
from distrain.logging.tensorboard import TBLogger

__all__ = [
    "EpochProgress",
    "StepStats",
    "StepTimer",
    "TBLogger",
    "eval_scalars",
    "flatten_config",
    "format_config",
    "format_config_markdown",
    "grad_norm",
    "memory_mb",
    "print_config",
    "print_summary",
    "progress_mode",
    "reduce_max",
    "summary_line",
    "train_scalars",
]

DISTRAIN_PRELOAD = ("tensorboardX", "tqdm")
