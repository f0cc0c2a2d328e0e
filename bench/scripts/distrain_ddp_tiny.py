"""The same 3 DDP steps written with distrain (init, wrap, cleanup). STRATEGY=fsdp for FSDP2.

CALL_CLEANUP=0 leaves the cleanup to distrain's atexit path, as in a script that forgets it.
"""

import os

import torch
from torch import nn

from distrain import ddp

ctx = ddp.init()
model = ddp.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), ctx,
                 strategy=os.environ.get("STRATEGY", "auto"))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    optimizer.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
if os.environ.get("CALL_CLEANUP", "1") == "1":
    ddp.cleanup()
