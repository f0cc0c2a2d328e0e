"""distrain: launch and run distributed PyTorch training.

The same training script runs unchanged under ``torchrun``, ``distrain launch`` (one node or
many) and ``distrain launch --launcher ray``. One import gives the whole worker API::

    import distrain

    ctx = distrain.init()                                  # process group + device
    model = distrain.wrap(model)                           # DDP | DataParallel | FSDP | plain
    loader = distrain.build_loader(dataset, batch_size=32) # sharded, resumable
    ckpt = distrain.Checkpointer("runs/x/ckpt")            # rank 0 writes, every rank restores
    tb = distrain.TBLogger("runs/x/tb")                    # rank 0 writes
    ...
    distrain.cleanup()

Every call takes ``ctx=`` optionally and defaults to the current context (the one
``distrain.init()`` returned). The names are imported on first use, so ``import distrain`` and
the CLI start without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distrain.amp import accumulate, autocast, grad_scaler
    from distrain.ckpt.checkpointer import Checkpointer
    from distrain.collectives import all_reduce_mean, barrier, print0
    from distrain.context import Context
    from distrain.data.loader import build_loader
    from distrain.group import cleanup, init
    from distrain.logging.tensorboard import TBLogger
    from distrain.wrapping import unwrap, wrap

from distrain.version import __version__ as __version__

# public name -> the module that defines it
_EXPORTS = {
    "Checkpointer": "distrain.ckpt.checkpointer",
    "Context": "distrain.context",
    "TBLogger": "distrain.logging.tensorboard",
    "accumulate": "distrain.amp",
    "all_reduce_mean": "distrain.collectives",
    "autocast": "distrain.amp",
    "barrier": "distrain.collectives",
    "build_loader": "distrain.data.loader",
    "cleanup": "distrain.group",
    "grad_scaler": "distrain.amp",
    "init": "distrain.group",
    "print0": "distrain.collectives",
    "unwrap": "distrain.wrapping",
    "wrap": "distrain.wrapping",
}

__all__ = [
    "Checkpointer",
    "Context",
    "TBLogger",
    "accumulate",
    "all_reduce_mean",
    "autocast",
    "barrier",
    "build_loader",
    "cleanup",
    "grad_scaler",
    "init",
    "print0",
    "unwrap",
    "wrap",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distrain' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
