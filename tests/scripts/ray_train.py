"""A small, deterministic digits training run, as a user would write it, plus fault hooks.

Each step sees the same 32 samples whatever the world size (the sampler interleaves ranks and
the global batch is fixed), so the weights depend only on the seed and the step count, up to
float rounding, and bit for bit for the same world size. A checkpoint (model, optimizer,
loader position) is written every --save-every steps to --ckpt with distrain.ckpt (and, with
--snapshot-every, an in-memory snapshot), and resumed from on a restart.

Fault hooks (first attempt only, TORCHELASTIC_RESTART_COUNT=0):
  --die-at S --die-rank R   rank R SIGKILLs itself after step S
  --hold-at S               every rank prints "holding at step S" and blocks after step S
--env-out DIR writes each rank's environment (and argv) to DIR/env-<rank>.json first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distrain import ddp
from distrain.ckpt import Checkpointer
from distrain.data import build_loader
from distrain.data.datasets import digits

GLOBAL_BATCH = 32

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--ckpt", default=None)
parser.add_argument("--save-every", type=int, default=1, help="durable checkpoint interval")
parser.add_argument("--snapshot-every", type=int, default=None, help="in-memory snapshot interval")
parser.add_argument("--die-at", type=int, default=-1)
parser.add_argument("--die-rank", type=int, default=1)
parser.add_argument("--hold-at", type=int, default=-1)
parser.add_argument("--env-out", default=None, help="write each rank's environment here")
args = parser.parse_args()
if args.env_out:
    env = {**os.environ, "__argv__": json.dumps(sys.argv[1:]), "__name__": __name__}
    (Path(args.env_out) / f"env-{os.environ['RANK']}.json").write_text(json.dumps(env))

ctx = ddp.init("gloo")
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
loader = build_loader(digits(train=True), ctx, global_batch_size=GLOBAL_BATCH, shuffle=True,
                      seed=0, num_workers=0, drop_last=True)
ckpt = (Checkpointer(args.ckpt, ctx, keep_last=2, snapshot_every=args.snapshot_every)
        if args.ckpt else None)
start = 0
if ckpt is not None:
    start = ckpt.load_latest(model=model, optimizer=optimizer, loader=loader) or 0
    if start:
        ddp.print0(f"resumed from step {start} with world size {ctx.world_size}")
wrapped = ddp.wrap(model, ctx)
batches = iter(loader)
for step in range(start + 1, args.steps + 1):
    images, labels = next(batches)
    loss = F.cross_entropy(wrapped(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    mean_loss = ddp.all_reduce_mean(float(loss.detach()))
    ddp.print0(f"step {step} loss {mean_loss:.4f}")
    if ckpt is not None:
        if args.snapshot_every:
            ckpt.snapshot(step, model=model, optimizer=optimizer, loader=loader)
        if step % args.save_every == 0:
            ckpt.save(step, model=model, optimizer=optimizer, loader=loader)
    if attempt == 0 and step == args.die_at and ctx.rank == args.die_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    if attempt == 0 and step == args.hold_at:
        print(f"holding at step {step}", flush=True)
        while True:
            signal.pause()  # until the launcher stops us

if ctx.is_main:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "weights.pt")
    (out / "info.json").write_text(json.dumps({
        "world_size": ctx.world_size, "attempt": attempt, "resumed_from": start,
        "steps": args.steps,
    }))
ddp.cleanup()
