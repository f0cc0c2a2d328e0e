"""A plain torchrun script, no distrain imports: 3 DDP steps, then destroy_process_group().

This is the script that aborts at exit ("terminate called without an active exception") in
about 1 run of 20 on gloo: the process group outlives destroy_process_group() and its threads
are still running when Python finalizes (docs/troubleshooting.md). Set CLEAN_EXIT=1 for the
two-line fix: import torch.distributed.nn before the group forms, release the wrapper before
destroying it.
"""

import gc
import os

import torch
import torch.distributed as dist
from torch import nn

CLEAN_EXIT = os.environ.get("CLEAN_EXIT") == "1"
if CLEAN_EXIT:
    # DDP imports this module; imported after the group formed, its default arguments hold it.
    import torch.distributed.nn

dist.init_process_group("gloo")
model = nn.parallel.DistributedDataParallel(nn.Linear(8, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    optimizer.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
if CLEAN_EXIT:
    del model, optimizer  # the reducer holds the group too
    gc.collect()
dist.barrier()
dist.destroy_process_group()
