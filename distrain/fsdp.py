"""FSDP2 sharding (``fully_shard``): placeholder until the sharded-runs work lands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from distrain.errors import ConfigError

if TYPE_CHECKING:
    from distrain.ddp import Context


def shard_model(model: nn.Module, ctx: Context, **kwargs: Any) -> nn.Module:
    raise ConfigError("strategy", "fsdp", "a sharding implementation", "use strategy='ddp' for now")


def release_fsdp(module: nn.Module) -> None:
    """Drop FSDP state that holds the process group (nothing yet)."""
