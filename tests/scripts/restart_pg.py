"""A plain script (no distrain): a gloo group whose rank 1 dies on the first attempt.

USE_DISTRAIN=1 joins through distrain.ddp.init instead of init_process_group.
"""

import os
import sys

import torch.distributed as dist

attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
if os.environ.get("USE_DISTRAIN") == "1":
    from distrain import ddp

    ddp.init()
else:
    dist.init_process_group("gloo")
dist.barrier()
if attempt == "0" and dist.get_rank() == 1:
    os._exit(1)  # a crash: the group must be rebuilt on the restart
dist.barrier()
print(f"rank {dist.get_rank()} finished attempt {attempt}", flush=True)
dist.destroy_process_group()
sys.exit(0)
