"""Report this rank's place in the world and a real all-reduce, as JSON in OUT_DIR/rank-N.json."""

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from distrain import ddp

ctx = ddp.init()
value = torch.tensor([float(ctx.rank + 1)])
dist.all_reduce(value)
report = {"host": socket.gethostname(), "rank": ctx.rank, "world_size": ctx.world_size,
          "node_rank": ctx.node_rank, "local_rank": ctx.local_rank, "sum": value.item(),
          "master_addr": os.environ.get("MASTER_ADDR", "")}
out = Path(os.environ["OUT_DIR"])
out.mkdir(parents=True, exist_ok=True)
(out / f"rank-{ctx.rank}.json").write_text(json.dumps(report))
ddp.cleanup()
