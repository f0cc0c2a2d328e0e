"""A small DDP loop whose ranks can hang or slow down on purpose (tests/launch/test_hangs.py).

--hang-rank R --hang-step S: rank R sleeps for ten minutes at step S (first attempt only).
--loader-hang: instead, rank R blocks inside its DataLoader (the dataset's __getitem__).
--slow-rank R --slow-steps A:B --slow-s T: rank R sleeps T seconds per step for steps A..B-1.
--ckpt DIR: checkpoint every step and resume from the latest one.
--tb DIR: rank 0 logs the loss to TensorBoard every step.
--ready FILE: rank 0 writes FILE at step --ready-step and the run then waits for FILE.go.
--pids DIR: each rank writes DIR/pid-RANK-ATTEMPT.
The lines that block carry a "# HANG:" marker the tests look for.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch.utils.data import Dataset

from distrain import ddp
from distrain.ckpt import Checkpointer
from distrain.data import build_loader
from distrain.logging import TBLogger


class Numbers(Dataset[torch.Tensor]):
    def __init__(self, size: int, blocked_rank: int | None, at_index_after: int) -> None:
        self.size = size
        self.blocked = blocked_rank == int(os.environ["RANK"])
        self.at = at_index_after

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.blocked and self.at <= 0:
            print("HANGING NOW", flush=True)
            time.sleep(600)  # HANG: loader
        self.at -= 1
        return torch.full((4,), float(index))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hang-rank", type=int, default=None)
    parser.add_argument("--hang-step", type=int, default=5)
    parser.add_argument("--loader-hang", action="store_true")
    parser.add_argument("--slow-rank", type=int, default=None)
    parser.add_argument("--slow-steps", default="0:0")
    parser.add_argument("--slow-s", type=float, default=0.0)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--tb", default=None)
    parser.add_argument("--ready", default=None)
    parser.add_argument("--ready-step", type=int, default=3)
    parser.add_argument("--pids", default=None)
    parser.add_argument("--collective-timeout", type=float, default=600.0)
    args = parser.parse_args()
    if args.pids:
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        Path(args.pids, f"pid-{os.environ['RANK']}-{restart}").write_text(str(os.getpid()))

    ctx = ddp.init(timeout=timedelta(seconds=args.collective_timeout))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.manual_seed(0)
    model = ddp.wrap(torch.nn.Linear(4, 1), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader_rank = args.hang_rank if args.loader_hang and attempt == 0 else None
    # Each rank reads one sample per step; the blocked rank blocks at its step --hang-step.
    loader = build_loader(Numbers(args.steps * ctx.world_size, loader_rank, args.hang_step), ctx,
                          batch_size=1, shuffle=False)
    checkpointer = Checkpointer(args.ckpt, ctx) if args.ckpt else None
    start = 0
    if checkpointer is not None:
        start = checkpointer.load_latest(model=model, optimizer=optimizer) or 0
    tb = TBLogger(args.tb, ctx) if args.tb else None
    slow_from, slow_to = (int(part) for part in args.slow_steps.split(":"))
    batches = iter(loader)
    for step in range(start, args.steps):
        batch = next(batches)
        if ctx.rank == args.hang_rank and step == args.hang_step and attempt == 0 \
                and not args.loader_hang:
            print("HANGING NOW", flush=True)
            time.sleep(600)  # HANG: sleep
        if ctx.rank == args.slow_rank and slow_from <= step < slow_to:
            time.sleep(args.slow_s)  # HANG: slow
        loss = model(batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if tb is not None:
            tb.scalar("train/loss", loss.item(), step)
        if checkpointer is not None:
            checkpointer.save(step + 1, model=model, optimizer=optimizer)
        if args.ready and step == args.ready_step:
            if ctx.rank == 0:
                Path(args.ready).write_text("at step")
            gate = Path(args.ready + ".go")
            while not gate.exists():  # the test sends its signal, then opens the gate
                with torch.no_grad():
                    model(batch)  # progress, so the hang watch sees a live run
                time.sleep(0.05)
    if tb is not None:
        tb.close()
    if ctx.rank == 0:
        print(f"finished {args.steps} steps (attempt {attempt})", flush=True)
    ddp.cleanup()


if __name__ == "__main__":
    main()
