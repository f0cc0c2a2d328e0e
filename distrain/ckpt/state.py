"""What goes into a checkpoint and how it comes back: objects, RNG states, safe loading.

Objects handed to ``Checkpointer.save(step, **objects)`` are of three sorts:

* ``module``: an ``nn.Module`` (DDP / DataParallel / compiled wrappers are unwrapped, so keys
  never carry a ``module.`` prefix); its state dict goes to ``<name>.pt``, loadable on its own;
* ``state_dict``: anything else with ``state_dict()``/``load_state_dict()`` (optimizer, LR
  scheduler, GradScaler, the loader or sampler, user objects); state dict to ``<name>.pt``;
* ``json``: plain JSON values (``extra={"config": ...}``, ``epoch=3``), all in ``extra.json``.

Every file is loadable with ``torch.load(weights_only=True)``: states are checked at save time
to contain only tensors, numbers, strings and containers, and RNG states are stored as tensors,
so no pickle of arbitrary objects is ever written and none is ever executed on load.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distrain.ckpt.store import CheckpointError, CheckpointPath, UnsafeCheckpointError
from distrain.ckpt.tensorfile import aligned_empty
from distrain.errors import ConfigError
from distrain.wrapping import unwrap

RESERVED = ("rng", "manifest")
RNG_FILE = "rng.pt"
JSON_FILE = "extra.json"
_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device,
           torch.Size, torch.memory_format, torch.layout)


def kind_of(name: str, obj: Any) -> str:
    """``module`` | ``state_dict`` | ``json`` for a named object, or a ConfigError."""
    if name in RESERVED:
        raise ConfigError("checkpoint object name", name, f"a name other than {RESERVED}",
                          "pass it under another keyword")
    if isinstance(obj, nn.Module):
        return "module"
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return "state_dict"
    try:
        json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError):
        raise ConfigError(
            f"checkpoint object {name}", type(obj).__name__,
            "an nn.Module, an object with state_dict()/load_state_dict(), or a JSON value",
            "add state_dict()/load_state_dict() to it or pass a JSON-able value",
        ) from None
    return "json"


def class_name(obj: Any) -> str:
    cls = type(unwrap(obj) if isinstance(obj, nn.Module) else obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def state_of(obj: Any, kind: str) -> Any:
    if kind == "module":
        return unwrap(obj).state_dict()
    if kind == "state_dict":
        return obj.state_dict()
    return obj


def snapshot(value: Any, *, copy: bool, where: str, staging: dict[str, torch.Tensor] | None = None) -> Any:
    """``value`` with every tensor on the CPU (copied when ``copy``: the caller keeps training
    while a background thread writes). Raises a ConfigError naming the first value that
    ``torch.load(weights_only=True)`` would refuse, so no unloadable checkpoint is written.

    ``staging``: CPU buffers from the previous snapshot, keyed by ``where``, reused for copies
    of the same shape (updated in place). Copying into pages that are already mapped avoids the
    page faults of a fresh ``clone()``, whose first touch of each page faults it in.
    """
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, nn.Parameter):
            raise ConfigError(where, type(value).__name__, "a plain torch.Tensor",
                              "convert it with .full_tensor() / torch.Tensor(...) before saving")
        tensor = value.detach()
        if copy and staging is not None and tensor.is_contiguous():
            return _staged_copy(tensor, where, staging)
        if tensor.device.type != "cpu":
            return tensor.to("cpu")
        return tensor.clone() if copy else tensor
    if type(value) in _LEAVES:
        return value
    if isinstance(value, np.generic):  # a numpy scalar: its plain Python value loads safely
        return value.item()
    if type(value) in (dict, OrderedDict):
        out = {k: snapshot(v, copy=copy, where=f"{where}.{k}", staging=staging) for k, v in value.items()}
        return OrderedDict(out) if type(value) is OrderedDict else out
    if type(value) in (list, tuple, set):
        items = [snapshot(v, copy=copy, where=f"{where}[{i}]", staging=staging) for i, v in enumerate(value)]
        return type(value)(items)
    if isinstance(value, np.ndarray):
        raise ConfigError(where, "numpy.ndarray", "a tensor (numpy arrays need pickle to load)",
                          "return torch.from_numpy(array) from state_dict()")
    raise ConfigError(where, type(value).__name__,
                      "tensors, numbers, strings, None and dict/list/tuple of them",
                      "return only such values from state_dict() (they load with weights_only=True)")


def _staged_copy(tensor: torch.Tensor, where: str, staging: dict[str, torch.Tensor]) -> torch.Tensor:
    buffer = staging.get(where)
    if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
        buffer = aligned_empty(tensor.shape, tensor.dtype)  # page-aligned: written by direct I/O
        staging[where] = buffer
    return buffer.copy_(tensor)


def safe_load(path: CheckpointPath, *, map_location: torch.device | str) -> Any:
    """``torch.load(weights_only=True)``; a pickle that would import or call code is refused.
    An object-store path is read whole into memory first (``torch.load`` seeks)."""
    try:
        source = path if isinstance(path, Path) else path.open("rb")
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds a pickle that would run code or build arbitrary "
            f"objects ({detail}); only tensors and plain values are loaded (weights_only=True). "
            "Do not load this file unless you trust its source") from None
    except (OSError, RuntimeError, EOFError) as error:
        raise CheckpointError(f"{path}: cannot be read: {error}") from error


def module_mismatch(module: nn.Module, state: Mapping[str, Any], shown: int = 3) -> str | None:
    """The first keys and shapes that differ between a saved module state and ``module``, or None."""
    own = unwrap(module).state_dict()
    problems: list[str] = []
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    if missing:
        problems.append(f"missing {', '.join(missing[:shown])}" + (" ..." if len(missing) > shown else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:shown])}"
                        + (" ..." if len(unexpected) > shown else ""))
    shapes = [f"{key} saved {list(value.shape)} here {list(own[key].shape)}" for key, value in state.items()
              if key in own and hasattr(value, "shape") and hasattr(own[key], "shape")
              and tuple(value.shape) != tuple(own[key].shape)]
    if shapes:
        problems.append("shape " + "; ".join(shapes[:shown]) + (" ..." if len(shapes) > shown else ""))
    return "; ".join(problems) or None


def restore_object(name: str, obj: Any, kind: str, state: Any) -> None:
    if kind == "module":
        unwrap(obj).load_state_dict(state)
    elif kind == "state_dict":
        obj.load_state_dict(state)
    elif isinstance(obj, MutableMapping) and isinstance(state, Mapping):
        obj.clear()  # a dict handed in receives the saved JSON value
        obj.update(state)
    else:
        raise ConfigError(f"checkpoint object {name}", type(obj).__name__,
                          "a dict to receive the saved JSON value",
                          f"pass {name}={{}} or read Checkpointer.values[{name!r}] after loading")


# -- RNG -------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA when in use, numpy, ``random``) as tensors."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [t.clone() for t in torch.cuda.get_rng_state_all()]
    return {
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np.asarray(np_keys, np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put back what :func:`capture_rng` took (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        count = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([t.cpu().to(torch.uint8) for t in cuda[:count]])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].cpu().numpy().astype(np.uint32),
                         int(numpy["pos"]), int(numpy["has_gauss"]),
                         float(numpy["cached_gaussian"])))
    python = state["python"]
    random.setstate((int(python["version"]), tuple(int(x) for x in python["state"].tolist()),
                     python["gauss_next"]))


def derived_seed(reference: Mapping[str, Any], *, rank: int, step: int) -> int:
    """A seed for a rank the checkpoint has no RNG state for (the world grew): a hash of rank 0's
    saved torch state, the rank and the step. Deterministic, and different for every rank."""
    digest = hashlib.sha256(reference["torch"].cpu().numpy().tobytes())
    digest.update(f"distrain-rng:{rank}:{step}".encode())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def restore_rank_rng(saved: Mapping[str, Any], *, rank: int, step: int) -> bool:
    """Restore ``rank``'s saved RNG; a rank beyond the saved world gets a derived seed.

    Returns True when the exact saved state was restored.
    """
    ranks = saved["ranks"]
    if rank < len(ranks):
        restore_rng(ranks[rank])
        return True
    seed_everything(derived_seed(ranks[0], rank=rank, step=step))
    return False
