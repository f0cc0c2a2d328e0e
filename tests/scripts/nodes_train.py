"""A small regression trained with a fixed global batch, for node loss/arrival tests.

    nodes_train.py --steps N --global-batch G --micro B --ckpt ROOT [--ckpt-every K] [--pace S]

Every optimizer step takes G samples whatever the world size (micro-batches of B, accumulated).
Each rank appends one JSON line per step to OUT_DIR/steps-<rank>.jsonl (group, world, step,
epoch, sample ids, time) and one per start to OUT_DIR/starts.jsonl; rank 0 writes the final
weights to OUT_DIR/final.pt. ``--pace`` slows each step so a test can act mid-run.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from distrain import ddp
from distrain.ckpt import Checkpointer
from distrain.data import build_loader

LENGTH, FEATURES = 128, 8


class Indexed(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(11)
        self.x = torch.randn(LENGTH, FEATURES, generator=generator)
        weights = torch.randn(FEATURES, 1, generator=generator)
        self.y = self.x @ weights + 0.1 * torch.randn(LENGTH, 1, generator=generator)

    def __len__(self) -> int:
        return LENGTH

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--ckpt-every", type=int, default=2)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--wait-at", type=int, default=0, help="wait here for --wait-world")
    parser.add_argument("--wait-world", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="collective timeout (ddp.init)")
    parser.add_argument("--preflight", action="store_true", help="check every host can use --ckpt first")
    args = parser.parse_args()
    out = Path(os.environ["OUT_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    # One group of workers (a rendezvous round): agents count their restarts on their own, so a
    # late node's count differs; the group's fresh store port is the same on every rank.
    group = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"

    ctx = ddp.init(timeout=args.timeout)
    if args.preflight:
        from distrain.preflight import check_hosts

        check_hosts(ctx, store=args.ckpt)
    torch.manual_seed(0)
    model = ddp.wrap(nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1)), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = build_loader(Indexed(), ctx, batch_size=args.micro, global_batch_size=args.global_batch,
                          seed=1, num_workers=0)
    ckpt = Checkpointer(args.ckpt, ctx, keep_last=2)
    state = {"model": model, "optimizer": optimizer, "loader": loader}
    step = ckpt.load_latest(**state) or 0
    if ctx.rank == 0:
        with open(out / "starts.jsonl", "a") as f:
            f.write(json.dumps({"group": group, "world": ctx.world_size, "step": step,
                                "time": time.time()}) + "\n")
    log = open(out / f"steps-{ctx.rank}.jsonl", "a")  # noqa: SIM115 (closed at the end)
    accumulation = loader.accumulation_steps
    while step < args.steps:
        epoch = loader.epoch
        loader.set_epoch(epoch)
        taken: list[int] = []
        for micro, (x, y, ids) in enumerate(loader):
            with ddp.accumulate(model, micro, accumulation):
                (F.mse_loss(model(x), y) / accumulation).backward()
            taken += [int(i) for i in ids]
            if (micro + 1) % accumulation:
                continue
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            log.write(json.dumps({"group": group, "world": ctx.world_size, "step": step, "epoch": epoch,
                                  "ids": taken, "time": time.time()}) + "\n")
            log.flush()
            taken = []
            if step % args.ckpt_every == 0:
                ckpt.save(step, **state)
            if step >= args.steps:
                break
            while step == args.wait_at and ctx.world_size < args.wait_world:
                time.sleep(0.1)  # until the launcher restarts the group with the late host in it
            time.sleep(args.pace)
        else:
            loader.set_epoch(epoch + 1)
    ckpt.wait()
    if ctx.rank == 0:
        torch.save(ddp.unwrap(model).state_dict(), out / "final.pt")
    log.close()
    ddp.cleanup()


if __name__ == "__main__":
    main()
