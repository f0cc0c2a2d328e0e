"""FSDP2 sharding: ``fully_shard`` on each block, then on the root (``wrap(..., strategy="fsdp")``).

Choosing blocks, in order of precedence:

* ``rule``: a callable ``module -> bool`` (your own policy);
* ``blocks``: module classes (or class names) to shard, e.g. ``[TransformerBlock]``;
* ``min_block_params``: every smallest submodule holding at least this many parameters not
  already inside a chosen block (like ``size_based_auto_wrap_policy``);
* default: each child of every ``nn.ModuleList`` (the layers of a transformer), if any.

The root is always sharded last. ``mixed_precision=True`` keeps bf16 parameters for compute and
reduces gradients in fp32; pass a ``MixedPrecisionPolicy`` for anything else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distrain.errors import ConfigError

if TYPE_CHECKING:
    from distrain.context import Context

log = logging.getLogger("distrain")
BlockSpec = Sequence[type[nn.Module] | str]


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _resolve_classes(model: nn.Module, blocks: BlockSpec) -> tuple[type[nn.Module], ...]:
    present = {type(m).__name__: type(m) for m in model.modules()}
    classes: list[type[nn.Module]] = []
    for block in blocks:
        if isinstance(block, str):
            if block not in present:
                raise ConfigError(
                    "blocks", block, f"a module class in the model ({', '.join(sorted(present))})",
                    "name a class that the model contains",
                )
            classes.append(present[block])
        elif isinstance(block, type) and issubclass(block, nn.Module):
            classes.append(block)
        else:
            raise ConfigError("blocks", block, "an nn.Module class or class name", "e.g. blocks=[Block]")
    return tuple(classes)


def choose_blocks(
    model: nn.Module,
    *,
    blocks: BlockSpec | None = None,
    min_block_params: int | None = None,
    rule: Callable[[nn.Module], bool] | None = None,
) -> list[nn.Module]:
    """The submodules to shard before the root (pure: no process group needed)."""
    children = [m for m in model.modules() if m is not model]
    if rule is not None:
        chosen = [m for m in children if rule(m)]
        asked = "rule"
    elif blocks is not None:
        classes = _resolve_classes(model, blocks)
        chosen = [m for m in children if isinstance(m, classes)]
        asked = f"blocks={[getattr(c, '__name__', c) for c in classes]}"
    elif min_block_params is not None:
        if min_block_params < 1:
            raise ConfigError("min_block_params", min_block_params, ">= 1", "e.g. min_block_params=1_000_000")
        chosen = _by_size(model, min_block_params)
        asked = f"min_block_params={min_block_params}"
    else:
        return [m for container in model.modules() if isinstance(container, nn.ModuleList)
                for m in container]
    if not chosen:
        raise ConfigError("fsdp blocks", asked, "at least one matching submodule",
                          "check the class names / threshold, or pass none to shard the root only")
    return chosen


def _by_size(model: nn.Module, threshold: int) -> list[nn.Module]:
    """Post-order: a module is a block when its parameters outside chosen blocks reach ``threshold``."""
    chosen: list[nn.Module] = []

    def visit(module: nn.Module) -> int:
        uncovered = sum(p.numel() for p in module.parameters(recurse=False))
        for child in module.children():
            uncovered += visit(child)
        if module is not model and uncovered >= threshold:
            chosen.append(module)
            return 0
        return uncovered

    visit(model)
    return chosen


def shard_model(
    model: nn.Module,
    ctx: Context,
    *,
    blocks: BlockSpec | None = None,
    min_block_params: int | None = None,
    rule: Callable[[nn.Module], bool] | None = None,
    mixed_precision: bool | Any = False,
    reshard_after_forward: bool = True,
    **unexpected: Any,
) -> nn.Module:
    """Apply FSDP2 to the chosen blocks, then the root; returns the (same, now sharded) model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if unexpected:
        name = sorted(unexpected)[0]
        raise ConfigError("wrap keyword", name, "an FSDP option (blocks, min_block_params, rule, "
                          "mixed_precision, reshard_after_forward)", "drop it or use strategy='ddp'")
    if mixed_precision is True:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif mixed_precision is False or mixed_precision is None:
        policy = MixedPrecisionPolicy()
    elif isinstance(mixed_precision, MixedPrecisionPolicy):
        policy = mixed_precision
    else:
        raise ConfigError("mixed_precision", mixed_precision, "True, False or a MixedPrecisionPolicy",
                          "e.g. mixed_precision=True for bf16 params and fp32 reduction")
    chosen = choose_blocks(model, blocks=blocks, min_block_params=min_block_params, rule=rule)
    model = model.to(ctx.device)
    for block in chosen:
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    if ctx.is_main:
        kinds: dict[str, int] = {}
        for block in chosen:
            kinds[type(block).__name__] = kinds.get(type(block).__name__, 0) + 1
        described = ", ".join(f"{n} x{c}" for n, c in kinds.items()) or "none"
        log.info("distrain.wrap: fsdp over %d ranks; blocks: %s; %d parameters", ctx.world_size,
                 described, _param_count(model))
    return model


def clip_grad_norm(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``clip_grad_norm_`` for DDP, DataParallel, plain and FSDP2 (DTensor) models alike.

    Returns the total norm as a plain tensor, the same on every rank.
    """
    total = nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type=norm_type)
    full = getattr(total, "full_tensor", None)
    return full() if callable(full) else total
