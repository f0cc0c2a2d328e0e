"""Rank 1 raises inside ``with ddp.init()`` after a DDP step; rank 0 finishes its work."""

import torch
from torch import nn

from distrain import ddp

with ddp.init() as ctx:
    model = ddp.wrap(nn.Linear(4, 2), ctx)
    model(torch.randn(3, 4)).sum().backward()
    if ctx.rank == 1:
        raise ValueError("rank 1 fails after a step")
    print("rank 0 done", flush=True)
ddp.cleanup()  # a second call is harmless
