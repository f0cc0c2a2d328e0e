"""A tutorial-style script that leaves DataLoader iterators alive: persistent workers, and the
``next(iter(loader))`` batch the tutorials take for ``add_graph``. Prints ``LAST <time>`` last."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from distrain import ddp
from distrain.data import build_loader

ctx = ddp.init()
OUT = Path(os.environ["LOADER_EXIT_OUT"])
(OUT / f"pid-{ctx.rank}").write_text(str(os.getpid()))
data = TensorDataset(torch.randn(256, 8), torch.randint(0, 2, (256,)))
loader = build_loader(data, ctx, batch_size=16, num_workers=2)
sample, _ = next(iter(loader))
model = ddp.wrap(nn.Linear(8, 2), ctx)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)


def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A function in the script: its globals hold it and it holds them (a reference cycle)."""
    return nn.functional.cross_entropy(model(x), y)


for epoch in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
    loader.set_epoch(epoch)
    for x, y in loader:
        loss = loss_of(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
ddp.cleanup()
print(f"LAST {time.time():.3f}", flush=True)
(OUT / f"last-{ctx.rank}").write_text(f"{time.time():.3f}")
