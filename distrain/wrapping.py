"""Model wrapping: which parallel wrapper to use (a pure decision), applying it, undoing it.

=================  ==========================================================================
strategy           result
=================  ==========================================================================
``auto``           DDP when world_size > 1; DataParallel when one process sees > 1 GPU; plain
``ddp``            DistributedDataParallel (needs a process group)
``dp``             DataParallel over the visible GPUs (plain module on CPU, with a note)
``fsdp``           FSDP2 ``fully_shard`` per block, then the root (:mod:`distrain.fsdp`)
``none``           the module on the device, unwrapped
=================  ==========================================================================
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distrain import stacks
from distrain.errors import ConfigError
from distrain.group import resolve, track_wrapper

if TYPE_CHECKING:
    from distrain.context import Context

log = logging.getLogger("distrain")
STRATEGIES = ("auto", "ddp", "dp", "fsdp", "none")


def choose_strategy(
    requested: str, *, world_size: int, visible_gpus: int, has_process_group: bool
) -> tuple[str, str]:
    """(strategy, reason). Pure: the whole decision table is tested on CPU."""
    if requested not in STRATEGIES:
        raise ConfigError("strategy", requested, " | ".join(STRATEGIES), 'use strategy="auto"')
    if requested in ("ddp", "fsdp") and not has_process_group:
        raise ConfigError(
            "strategy", requested, "a process group (a launched job)",
            "start the script with distrain launch / torchrun, or use strategy='auto'",
        )
    if requested == "dp" and world_size > 1:
        # Each rank would train its own DataParallel copy with no gradient exchange: wrong, silently.
        raise ConfigError(
            "strategy", requested, f"one process per machine for DataParallel (this job has {world_size})",
            "use strategy='ddp' (or 'auto') with several ranks, or launch --nproc-per-node 1 for 'dp'",
        )
    if requested == "dp" and visible_gpus < 1:
        return "none", "DataParallel asked for but no GPU is visible: plain module on CPU"
    if requested != "auto":
        return requested, f"strategy={requested!r} asked for"
    if world_size > 1:
        return "ddp", f"{world_size} processes: DistributedDataParallel"
    if visible_gpus > 1:
        return "dp", f"one process sees {visible_gpus} GPUs: DataParallel fallback"
    return "none", "one process, at most one device: plain module"


def wrap(
    model: nn.Module,
    ctx: Context | None = None,
    strategy: str = "auto",
    *,
    sync_batchnorm: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Move ``model`` to ``ctx.device`` and wrap it as :func:`choose_strategy` decides.

    Args:
        model: The model (on any device).
        ctx: The worker's context; the current one by default.
        strategy: ``"auto"`` (DDP with a process group, DataParallel on one process with several
            GPUs, else plain), ``"ddp"``, ``"dp"``, ``"fsdp"`` or ``"none"``.
        sync_batchnorm: Convert BatchNorm layers to SyncBatchNorm (DDP).
        **kwargs: Passed to the wrapper: ``find_unused_parameters``, ``gradient_as_bucket_view``,
            ``static_graph`` for DDP; ``blocks``, ``min_block_params``, ``mixed_precision``,
            ``reshard_after_forward`` for FSDP.

    Returns:
        The wrapped model (``unwrap`` gives the original back); released at :func:`cleanup`.

    Raises:
        ConfigError: An unknown strategy, or one this world cannot run.
    """
    ctx = resolve(ctx)
    visible = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    chosen, reason = choose_strategy(
        strategy, world_size=ctx.world_size, visible_gpus=visible, has_process_group=ctx.distributed
    )
    if ctx.is_main:
        # Asked for one wrapper, got another: a warning, shown without any logging setup.
        notice = log.warning if strategy not in ("auto", chosen) else log.info
        notice("distrain.wrap: %s (%s)", chosen, reason)
    if chosen == "fsdp":
        from distrain.fsdp import shard_model

        sharded = shard_model(model, ctx, **kwargs)
        track_wrapper(sharded)
        stacks.watch_model(sharded)
        return sharded
    unknown = set(kwargs) - {"find_unused_parameters", "gradient_as_bucket_view", "static_graph",
                             "broadcast_buffers", "bucket_cap_mb", "output_device"}
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(
            "wrap keyword", name, "a DistributedDataParallel option",
            "see torch.nn.parallel.DistributedDataParallel for the accepted keywords",
        )
    if sync_batchnorm and chosen == "ddp":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if chosen == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)
        track_wrapper(wrapped)
    elif chosen == "dp":
        wrapped = nn.DataParallel(model)
    else:
        wrapped = model
    stacks.watch_model(wrapped)  # progress for the hang watch and step times for stragglers
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / DataParallel / torch.compile (FSDP2 modules are their own)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
