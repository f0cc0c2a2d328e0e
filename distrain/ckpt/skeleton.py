"""A training state as JSON plus a list of tensors: how a snapshot's structure is written each step.

``encode(state, tensors)`` walks the state once: every tensor is appended to ``tensors`` and
replaced by ``["T", index]``; every container becomes a tagged list (``["d", [k, v, k, v, ...]]``
for a dict, ``"o"`` an OrderedDict, ``"l"`` a list, ``"t"`` a tuple, ``"s"`` a set), so dict keys
keep their type (an optimizer's state is keyed by int) and no user value can be mistaken for a
tag; JSON scalars stay as they are. ``decode`` is the inverse. The result goes through
``json.dumps`` (C speed) and back through ``json.loads``: nothing is unpickled on load. The values
accepted are those a checkpoint accepts (``state.snapshot``): anything else raises its error.
"""

from __future__ import annotations

import json
import marshal
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch
from torch import nn

from distrain.errors import ConfigError

_SCALARS = frozenset((str, int, float, bool, type(None)))
_TENSORS = frozenset((torch.Tensor, nn.Parameter))
_NAMED = (torch.dtype, torch.memory_format, torch.layout)  # torch.<name>


def encode(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` as JSON-able tagged lists; its tensors appended to ``tensors`` (as they are:
    the caller copies them under ``no_grad``). Scalars are tested inline: it runs every step."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict or kind is OrderedDict:
        pairs = []
        for key, item in value.items():
            pairs.append(key if type(key) in _SCALARS else encode(key, tensors))
            inner = type(item)
            if inner in _SCALARS:
                pairs.append(item)
            elif inner in _TENSORS:  # inline: most values of a state dict are tensors
                tensors.append(item)
                pairs.append(["T", len(tensors) - 1])
            else:
                pairs.append(encode(item, tensors))
        return ["d" if kind is dict else "o", pairs]
    if kind in _TENSORS:
        tensors.append(value)
        return ["T", len(tensors) - 1]
    if kind is list or kind is tuple or kind is set:
        return ["l" if kind is list else "t" if kind is tuple else "s",
                [v if type(v) in _SCALARS else encode(v, tensors) for v in value]]
    if kind in _NAMED:
        return ["n", str(value).removeprefix("torch.")]
    if kind is torch.Size:
        return ["S", list(value)]
    if kind is torch.device:
        return ["D", str(value)]
    if kind is bytes:
        return ["B", value.hex()]
    if kind is complex:
        return ["c", value.real, value.imag]
    if isinstance(value, np.generic) and not isinstance(value, np.ndarray):
        return encode(value.item(), tensors)
    raise TypeError(kind.__name__)


def encode_state(name: str, state: Any, tensors: list[torch.Tensor]) -> Any:
    """:func:`encode` of the state of the object ``name``; a value a checkpoint would refuse
    raises the checkpoint's one-line ConfigError naming it."""
    try:
        return encode(state, tensors)
    except TypeError:
        from distrain.ckpt.state import snapshot

        snapshot(state, copy=False, where=name)  # raises, naming the first bad value
        raise ConfigError(name, type(state).__name__, "tensors, numbers, strings and containers",
                          "return only such values from state_dict()") from None


class JsonMemo:
    """``json.dumps`` of encoded values that mostly repeat from step to step (a model's
    structure, an optimizer's hyperparameters): each key keeps its last value's ``marshal``
    bytes and JSON text. marshal, not ``==``: it is several times faster than ``json.dumps``
    and tells 1, 1.0 and True apart, which ``==`` does not, so equal bytes mean the same JSON."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[Hashable, tuple[bytes, str]] = {}

    def dumps(self, key: Hashable, value: Any) -> str:
        packed = marshal.dumps(value)
        last = self._last.get(key)
        if last is not None and last[0] == packed:
            return last[1]
        text = json.dumps(value)  # the default encoder is cached: faster than a compact one
        self._last[key] = (packed, text)
        return text


def decode(value: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of :func:`encode`, with ``tensors`` in the order they were appended."""
    if not isinstance(value, list):
        return value
    tag, body = value[0], value[1]
    if tag == "d" or tag == "o":
        items = [(decode(body[i], tensors), decode(body[i + 1], tensors)) for i in range(0, len(body), 2)]
        return dict(items) if tag == "d" else OrderedDict(items)
    return _DECODERS[tag](value, tensors)


_DECODERS: dict[str, Callable[[list[Any], list[torch.Tensor]], Any]] = {
    "T": lambda v, tensors: tensors[v[1]],
    "l": lambda v, tensors: [decode(x, tensors) for x in v[1]],
    "t": lambda v, tensors: tuple(decode(x, tensors) for x in v[1]),
    "s": lambda v, tensors: {decode(x, tensors) for x in v[1]},
    "n": lambda v, _: _named(v[1]),
    "S": lambda v, _: torch.Size(v[1]),
    "D": lambda v, _: torch.device(v[1]),
    "B": lambda v, _: bytes.fromhex(v[1]),
    "c": lambda v, _: complex(v[1], v[2]),
}


def _named(name: str) -> Any:
    found = getattr(torch, name, None)
    if not isinstance(found, _NAMED):
        raise ValueError(f"not a torch dtype, layout or memory format: {name}")
    return found


def dtype_named(name: str) -> torch.dtype:
    """The dtype ``torch.<name>`` (as :func:`dtype_name` wrote it); ValueError for anything else."""
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"not a dtype: {name}")
    return found


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
