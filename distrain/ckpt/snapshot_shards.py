"""FSDP states in a snapshot: each rank keeps the local shards of its model and optimizer.

A snapshot holds plain tensors only (:mod:`distrain.ckpt.skeleton`). The sharded state dicts that
``torch.distributed.checkpoint.state_dict`` gives (the same the sharded checkpoint writes) hold
``DTensor`` values; :func:`local_states` replaces each one by ``{SHARD: local tensor, "shape":
global shape, "stride": global stride}`` and :func:`restore_local` turns them back into ``DTensor``
values on the live model's mesh and placements, then loads them with ``set_model_state_dict`` /
``set_optimizer_state_dict``. A snapshot taken this way restores only on the same world size and
rank (the shard layout): the agreement in :mod:`distrain.ckpt.snapshot_plan` asks for that.
"""

from __future__ import annotations

from typing import Any

import torch

from distrain.ckpt.convert import Pairing

SHARD = "__distrain_shard__"  # marks a DTensor's local part in a snapshot (no state dict key is this)


def local_states(pairing: Pairing, names: set[str]) -> dict[str, Any]:
    """The sharded models' and optimizers' state dicts among ``names``, DTensors as local parts."""
    from distrain.ckpt.sharded import dcp_states

    return {name: _to_local(state) for name, state in dcp_states(pairing, names).items()}


def _to_local(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return {SHARD: value.to_local(), "shape": list(value.shape), "stride": list(value.stride())}
    if isinstance(value, dict):
        return {key: _to_local(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_local(item) for item in value]
    return value


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (the storage an optimizer step writes); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def restore_local(pairing: Pairing, states: dict[str, Any]) -> None:
    """Load what :func:`local_states` took (by object name) into the models and optimizers."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    templates: dict[str, dict[str, Any]] = {}

    def template(model: str) -> dict[str, Any]:
        if model not in templates:
            templates[model] = get_model_state_dict(pairing.modules[model])
        return templates[model]

    for name, module in pairing.modules.items():
        if name in states:
            live = template(name)
            state = {key: _to_dtensor(value, live[key]) for key, value in states[name].items()}
            set_model_state_dict(module, state)
    for name, (model, optimizer) in pairing.optimizers.items():
        if name in states:
            live = template(model)
            state = dict(states[name])
            state["state"] = {fqn: {key: _to_dtensor(value, live[fqn]) for key, value in entries.items()}
                              for fqn, entries in state["state"].items()}
            set_optimizer_state_dict(pairing.modules[model], optimizer, state)


def _to_dtensor(value: Any, like: Any) -> Any:
    """``value`` as a DTensor placed as ``like`` (the live parameter of the same name)."""
    if not (isinstance(value, dict) and SHARD in value):
        return value
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        raise ValueError("a sharded tensor in the snapshot is not sharded in this model")
    local = value[SHARD].to(like.to_local().device)
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=torch.Size(value["shape"]), stride=tuple(value["stride"]))
