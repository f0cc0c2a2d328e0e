"""Which objects are sharded, and converting their states between sharded and full form.

A model wrapped with FSDP holds only its shard of every parameter (a ``DTensor``), and so does
its optimizer. ``torch.distributed.checkpoint.state_dict`` turns both into state dicts keyed by
parameter name: sharded (for DCP) or gathered in full. A full checkpoint stores the optimizer in
``torch.optim``'s own format (state keyed by the parameter's position), so one written by an
FSDP run loads into a DDP run with plain ``optimizer.load_state_dict`` and the other way round;
:func:`names_to_positions` and :func:`positions_to_names` translate.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distrain.errors import ConfigError
from distrain.wrapping import unwrap


def is_fsdp(obj: Any) -> bool:
    """True for a model (or a model with a submodule) sharded by FSDP2 or FSDP1."""
    if not isinstance(obj, nn.Module) or "torch.distributed.fsdp" not in sys.modules:
        return False  # (no FSDP model can exist before FSDP is imported; importing it is slow)
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in unwrap(obj).modules())


def original_class(obj: Any) -> str:
    """``module.Class`` of ``obj``; for an FSDP2 model its own class, not FSDP's subclass of it."""
    from distrain.ckpt.state import class_name

    if not is_fsdp(obj):
        return class_name(obj)
    from torch.distributed.fsdp import FSDPModule

    target = unwrap(obj) if isinstance(obj, nn.Module) else obj
    if isinstance(target, FSDPModule):
        bases = [b for b in type(target).__bases__ if b is not FSDPModule]
        if bases:
            return f"{bases[0].__module__}.{bases[0].__qualname__}"
    return class_name(obj)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pairing:
    """The models among the saved objects and, for every optimizer, the model it steps."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, tuple[str, torch.optim.Optimizer]]

    @property
    def names(self) -> set[str]:
        return set(self.modules) | set(self.optimizers)

    def sharded_names(self) -> set[str]:
        """The models that are FSDP-wrapped and the optimizers stepping them."""
        fsdp = {name for name, module in self.modules.items() if is_fsdp(module)}
        return fsdp | {name for name, (model, _) in self.optimizers.items() if model in fsdp}


def pair(objects: Mapping[str, Any], kinds: Mapping[str, str]) -> Pairing:
    """Find each optimizer's model (the one holding all its parameters); a ConfigError if none."""
    modules = {name: unwrap(obj) for name, obj in objects.items() if kinds[name] == "module"}
    owners = {id(p): name for name, module in modules.items() for p in module.parameters()}
    optimizers: dict[str, tuple[str, torch.optim.Optimizer]] = {}
    for name, obj in objects.items():
        if not isinstance(obj, torch.optim.Optimizer):
            continue
        found = {owners.get(id(p)) for group in obj.param_groups for p in group["params"]}
        owner = found.pop() if len(found) == 1 else None
        if owner is None:
            raise ConfigError(
                f"checkpoint object {name}", type(obj).__name__,
                "an optimizer over the parameters of exactly one model saved in the same call",
                f"pass its model too, e.g. save(step, model=model, {name}={name})")
        optimizers[name] = (owner, obj)
    return Pairing(modules=modules, optimizers=optimizers)


def positions_to_names(state: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """``optimizer.state_dict()`` (keyed by position) -> keyed by parameter name."""
    groups = [{**group, "params": [names[int(i)] for i in group["params"]]}
              for group in state["param_groups"]]
    return {"state": {names[int(i)]: value for i, value in state["state"].items()},
            "param_groups": groups}


def names_to_positions(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keyed by parameter name (as ``get_optimizer_state_dict`` returns) -> ``torch.optim``'s format."""
    order = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [{**group, "params": [index[n] for n in group["params"]]} for group in state["param_groups"]]
    return {"state": {index[n]: value for n, value in state["state"].items()}, "param_groups": groups}


def parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of ``optimizer``'s parameters, in the optimizer's order."""
    names = {id(p): n for n, p in unwrap(module).named_parameters(remove_duplicate=False)}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_full(objects: Mapping[str, Any], kinds: Mapping[str, str]) -> dict[str, Any]:
    """Full states of the FSDP models and their optimizers (a collective: call on every rank).

    Rank 0 gets the whole tensors on the CPU; the other ranks get ``{}`` for each name.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    pairing = pair(objects, kinds)
    wanted = pairing.sharded_names()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out: dict[str, Any] = {}
    for name in sorted(wanted & set(pairing.modules)):
        out[name] = get_model_state_dict(pairing.modules[name], options=options)
    for name in sorted(wanted & set(pairing.optimizers)):
        model, optimizer = pairing.optimizers[name]
        state = get_optimizer_state_dict(pairing.modules[model], optimizer, options=options)
        out[name] = names_to_positions(state) if state else {}
    return out


def restore_full(objects: Mapping[str, Any], kinds: Mapping[str, str],
                 states: Mapping[str, Any]) -> set[str]:
    """Load full states (read by every rank) into FSDP models and their optimizers, each rank
    keeping its shard. Returns the names it restored; the caller restores the rest."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    pairing = pair(objects, kinds)
    wanted = pairing.sharded_names() & set(states)
    options = StateDictOptions(full_state_dict=True)
    for name in sorted(wanted & set(pairing.modules)):
        set_model_state_dict(pairing.modules[name], dict(states[name]), options=options)
    for name in sorted(wanted & set(pairing.optimizers)):
        model, optimizer = pairing.optimizers[name]
        by_name = positions_to_names(states[name], parameter_names(pairing.modules[model], optimizer))
        set_optimizer_state_dict(pairing.modules[model], optimizer, by_name, options=options)
    return wanted
