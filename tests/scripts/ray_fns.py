"""Functions for ``distrain.launch.run(fn, nproc=..., launcher="ray")`` tests (importable by name)."""

from __future__ import annotations

import os
from typing import Any


def rank_report(tag: str) -> dict[str, Any]:
    """Join the process group and return what this rank saw (a real all-reduce included)."""
    import torch

    from distrain import ddp

    ctx = ddp.init("gloo")
    total = ddp.all_reduce_mean(torch.tensor([float(ctx.rank)]))
    return {"tag": tag, "rank": ctx.rank, "world_size": ctx.world_size,
            "mean_rank": float(total.item()), "pid": os.getpid(),
            "restart": os.environ["TORCHELASTIC_RESTART_COUNT"]}
