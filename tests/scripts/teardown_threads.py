"""Train 3 steps (STRATEGY: ddp or fsdp), clean up, then write the names of the threads this
process still runs to $OUT_DIR/threads-<rank>.json: the process group's must be gone, or they
run into interpreter finalization, where they can abort the process (docs/troubleshooting.md)."""

import json
import os
from pathlib import Path

import torch
from torch import nn

from distrain import ddp

ctx = ddp.init()
model = ddp.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), ctx,
                 strategy=os.environ["STRATEGY"])
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    optimizer.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
ddp.cleanup()
tasks = Path("/proc/self/task")
names = sorted((task / "comm").read_text().strip() for task in tasks.iterdir())
Path(os.environ["OUT_DIR"], f"threads-{ctx.rank}.json").write_text(json.dumps(names))
