"""The worker side: process group, device pinning, model wrapping, collectives, clean exit.

Five calls make a distributed training script (see README "Your training script")::

    ctx = ddp.init()                       # process group + device; a world of one without a launcher
    model = ddp.wrap(model, ctx)           # DDP | DataParallel | FSDP | plain
    loader = data.build_loader(ds, ctx, batch_size=64)
    ...
    ddp.cleanup()                          # or: with ddp.init() as ctx: ...

This module only gathers the worker API under one name (``import distrain`` gives the same);
the code lives in :mod:`distrain.group` (init, cleanup), :mod:`distrain.wrapping`,
:mod:`distrain.amp`, :mod:`distrain.fsdp` and :mod:`distrain.collectives`. Nothing inside
distrain imports this module.
"""

from __future__ import annotations

from distrain.amp import accumulate, autocast, grad_scaler
from distrain.collectives import all_reduce_mean, barrier, print0
from distrain.context import Context
from distrain.fsdp import clip_grad_norm
from distrain.group import (
    BACKENDS,
    cleanup,
    formed_group,
    init,
    on_cleanup,
    resolve_backend,
    resolve_device,
)
from distrain.wrapping import choose_strategy, unwrap, wrap

__all__ = [
    "BACKENDS",
    "Context",
    "accumulate",
    "all_reduce_mean",
    "autocast",
    "barrier",
    "choose_strategy",
    "cleanup",
    "clip_grad_norm",
    "formed_group",
    "grad_scaler",
    "init",
    "on_cleanup",
    "print0",
    "resolve_backend",
    "resolve_device",
    "unwrap",
    "wrap",
]
