"""A real training run with checkpoints, for tests/ckpt/test_ckpt_resume.py.

A dropout MLP under DDP on a shuffled loader with a worker process; every step also draws from
numpy and ``random`` so that each RNG a rank owns changes the result. It resumes from the newest
checkpoint in ``--ckpt`` (when given), trains until ``--steps`` (or stops after ``--stop-at``),
saves at ``--save-at`` steps, and writes what it did to ``--out``:
``rank<R>.json`` (the sample indices each step took) and, on rank 0, ``final.pt``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from distrain import ddp
from distrain.amp import grad_scaler
from distrain.ckpt import Checkpointer
from distrain.data import build_loader


class Indexed(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    def __init__(self, length: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(length, 8, generator=generator)
        self.y = torch.randn(length, 1, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[index], self.y[index], index


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--save-at", type=int, nargs="*", default=[])
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=96)
    args = parser.parse_args()

    ctx = ddp.init()
    torch.manual_seed(100 + ctx.rank)  # every rank its own streams: restoring the wrong one shows
    np.random.seed(200 + ctx.rank)
    random.seed(300 + ctx.rank)
    model = ddp.wrap(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1)), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    scaler = grad_scaler(ctx)
    loader = build_loader(Indexed(args.length), ctx, batch_size=8, shuffle=True, seed=7, num_workers=1)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
             "loader": loader}
    ckpt = Checkpointer(args.ckpt, ctx, async_save=args.async_save) if args.ckpt else None
    step = (ckpt.load_latest(**state) if ckpt else None) or 0
    seen: list[list[object]] = []
    epoch, stop = loader.epoch, False
    while step < args.steps and not stop:
        loader.set_epoch(epoch)
        for x, y, index in loader:
            weight = 1.0 + 1e-3 * float(np.random.rand()) + 1e-3 * random.random()
            loss = ((model(x) - y) ** 2).mean() * weight
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            seen.append([step, epoch, index.tolist()])
            if ckpt and step in args.save_at:
                ckpt.save(step, **state, extra={"loss": loss.item(), "epoch": epoch})
            if step == args.stop_at or step >= args.steps:
                stop = True
                break
        epoch += 1
    out = Path(args.out)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(seen))
    if ctx.is_main:
        torch.save({"model": ddp.unwrap(model).state_dict(), "optimizer": optimizer.state_dict()},
                   out / "final.pt")
    ddp.cleanup()  # also finishes an asynchronous save still being written


if __name__ == "__main__":
    main()
