"""A plain torchrun script, no distrain imports: 3 DDP steps, then destroy_process_group().

This is the script that aborts at exit ("terminate called without an active exception") in
about 1 run of 9 on gloo: the DDP wrapper still holds the process group when Python finalizes.
Set CLEAN_EXIT=1 for the one-line fix (release the wrapper before destroying the group).
"""

import gc
import os

import torch
import torch.distributed as dist
from torch import nn

dist.init_process_group("gloo")
model = nn.parallel.DistributedDataParallel(nn.Linear(8, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    optimizer.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
if os.environ.get("CLEAN_EXIT") == "1":
    del model, optimizer  # the fix: nothing holding the group survives into finalization
    gc.collect()
dist.barrier()
dist.destroy_process_group()
