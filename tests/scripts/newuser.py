"""What a new user's script does wrong (or right), by mode (argv[1]); see tests/launch/test_newuser.py."""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from distrain import ddp

mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
if mode == "dp":  # DataParallel asked for, under any number of ranks
    ctx = ddp.init()
    model = ddp.wrap(nn.Linear(4, 2), ctx, strategy="dp")
    print("wrapped", type(model).__name__, flush=True)
    ddp.cleanup()
elif mode == "nogroup":  # trains without ever joining the group
    print("trained alone", os.environ.get("RANK"), torch.zeros(1).item(), flush=True)
elif mode == "raise_once":  # rank 1 fails on the first attempt only
    ctx = ddp.init()
    if ctx.rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        raise ConnectionResetError("peer gone")
    print("attempt", os.environ.get("TORCHELASTIC_RESTART_COUNT"), "rank", ctx.rank, flush=True)
    ddp.cleanup()
elif mode in ("save_small", "load_big"):  # a checkpoint of one model loaded into another
    from distrain.ckpt import Checkpointer

    ctx = ddp.init()
    width = 3 if mode == "save_small" else 10
    model = ddp.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, width)), ctx)
    ckpt = Checkpointer(sys.argv[2], ctx)
    if mode == "save_small":
        ckpt.save(5, model=model)
    else:
        ckpt.load_latest(model=model)
    ddp.cleanup()
elif mode == "tutorial_tb":  # the tutorials' TensorBoard calls, through TBLogger; resumes
    import json
    from pathlib import Path

    from matplotlib.figure import Figure

    from distrain.logging import TBLogger

    ctx = ddp.init()
    run = Path(sys.argv[2])
    state = run / "state.json"
    start = json.loads(state.read_text())["step"] + 1 if state.exists() else 1
    tb = TBLogger(run / "tb", ctx, purge_step=start if start > 1 else None)
    print(f"writer rank{ctx.rank} {type(tb.writer).__name__}", flush=True)
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for step in range(start, start + 3):
        tb.scalar("Loss/train", 1.0 / step, step)
        tb.scalar("Accuracy/test", 1.0 - 1.0 / (step + 1), step)
    tb.image("first_image", images[0], step)
    tb.images("inputs", images, step)
    figure = Figure(figsize=(2, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    tb.figure("curve", figure, step)
    tb.embedding(images.view(6, -1), metadata=torch.arange(6) % 3, label_img=images, step=step)
    tb.close()
    if ctx.is_main:
        state.write_text(json.dumps({"step": step}))
    ddp.cleanup()
else:
    print("plain run, world", os.environ.get("WORLD_SIZE"), "argv", sys.argv[1:], flush=True)
