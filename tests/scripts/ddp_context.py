"""Init distrain, all-reduce the rank, write the Context as JSON to $OUT_DIR/ctx-<rank>.json."""

import json
import os
from pathlib import Path

import torch

from distrain import ddp

ctx = ddp.init()
total = torch.tensor([float(ctx.rank)])
if ctx.distributed:
    torch.distributed.all_reduce(total)
fields = {k: getattr(ctx, k) for k in ("rank", "local_rank", "world_size", "local_world_size",
                                       "node_rank", "backend", "is_main")}
fields["device"] = str(ctx.device)
fields["rank_sum"] = total.item()
Path(os.environ["OUT_DIR"], f"ctx-{ctx.rank}.json").write_text(json.dumps(fields))
ddp.cleanup()
