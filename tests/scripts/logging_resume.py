"""A tiny DDP training run that logs the standard set and resumes from its own checkpoint.

Used by tests/logging/test_logging_tb.py: run it, SIGKILL rank 0 once ``--hang-after`` steps are logged
(it prints ``ready-to-kill PID``, then waits), run it again: it restores the last checkpoint
and logs with ``purge_step`` so TensorBoard's step axis has no duplicates.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distrain import ddp
from distrain.logging import StepTimer, TBLogger, grad_norm, train_scalars

LR = 0.05


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ckpt-every", type=int, default=4)
    parser.add_argument("--hang-after", type=int, default=0)
    args = parser.parse_args()
    ctx = ddp.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ckpt = args.run_dir / "ckpt.pt"
    start = 1
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"]) + 1
    model = ddp.wrap(model, ctx)
    # The first step this run logs: everything at or after it from the killed run is dropped.
    tb = TBLogger(args.run_dir / "tb", ctx, purge_step=start if start > 1 else None)
    timer = StepTimer(ctx)
    for step in range(start, args.steps + 1):
        x, y = batch(ctx.rank, step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        norm = grad_norm(model)
        optimizer.step()
        timer.lap(samples=len(x))
        tb.scalars(train_scalars(ctx, loss=loss, lr=LR, epoch=0, grad_norm=norm,
                                 stats=timer.window()), step)
        tb.flush()  # every point on disk before the kill, so the purge has work to do
        if step % args.ckpt_every == 0 and ctx.is_main:
            state = {"model": ddp.unwrap(model).state_dict(),
                     "optimizer": optimizer.state_dict(), "step": step}
            torch.save(state, args.run_dir / "ckpt.tmp")
            os.replace(args.run_dir / "ckpt.tmp", ckpt)
        if step == args.hang_after and ctx.is_main:
            print(f"ready-to-kill {os.getpid()}", flush=True)
            threading.Event().wait()  # until the test kills this process
    tb.close()
    ddp.cleanup()


if __name__ == "__main__":
    main()
