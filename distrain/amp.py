"""Mixed precision and gradient accumulation helpers.

* :func:`autocast`: fp16 autocast on CUDA (bf16 if asked), bf16 autocast on CPU.
* :func:`grad_scaler`: a ``GradScaler`` that is active on CUDA with fp16, a no-op elsewhere.
* :func:`accumulate`: skip the DDP gradient all-reduce (``no_sync``) on all but the last
  micro-step, so accumulating K micro-batches costs one all-reduce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from distrain.group import resolve

if TYPE_CHECKING:
    from distrain.context import Context


def autocast(
    ctx: Context | None = None, *, enabled: bool = True, dtype: torch.dtype | None = None
) -> torch.autocast:
    """``torch.autocast`` for this worker's device: fp16 on CUDA, bf16 on CPU by default."""
    device_type = resolve(ctx).device.type
    default = torch.float16 if device_type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device_type, dtype=dtype or default, enabled=enabled)


def grad_scaler(ctx: Context | None = None, *, enabled: bool = True) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on CUDA; disabled (a transparent no-op) on CPU."""
    device_type = resolve(ctx).device.type
    return torch.amp.GradScaler(device_type, enabled=enabled and device_type == "cuda")


@contextlib.contextmanager
def accumulate(model: nn.Module, micro_step: int, num_micro_steps: int) -> Iterator[None]:
    """Run a micro-step's forward/backward; gradients are all-reduced on the last one only."""
    last = (micro_step + 1) % num_micro_steps == 0
    no_sync = getattr(model, "no_sync", None)
    if last or no_sync is None:
        yield
    else:
        with no_sync():
            yield
