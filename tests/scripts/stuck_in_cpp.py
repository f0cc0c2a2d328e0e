"""Both ranks block in a gloo recv from each other (in C++, where Python never handles a signal),
after writing pid-<rank> into $OUT_DIR."""

import os
from pathlib import Path

import torch
import torch.distributed as dist

from distrain import ddp

ctx = ddp.init(timeout=600)
Path(os.environ["OUT_DIR"], f"pid-{ctx.rank}").write_text(str(os.getpid()))
dist.recv(torch.zeros(1), src=1 - ctx.rank)
