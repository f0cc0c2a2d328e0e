"""A small DDP run that saves and exits on SIGTERM, for tests/cluster/test_slurm*.py.

Resumes from ``RUN_DIR/ckpt``; trains to ``--steps``; on ``distrain.preemption.StopSignal`` saves
and exits. ``--gate-at K`` makes a fresh (not resumed) run wait at step K until its SIGTERM comes
(bounded), after writing ``RUN_DIR/gate-rank<R>``: the test knows when to preempt. ``--fail-at K``
makes the last rank exit 1 at step K. Rank 0 writes the final weights to ``RUN_DIR/final.pt``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
from torch import nn

from distrain import ddp
from distrain.ckpt import Checkpointer
from distrain.data import build_loader
from distrain.preemption import StopSignal


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--gate-at", type=int, default=None)
    parser.add_argument("--fail-at", type=int, default=None)
    args = parser.parse_args()

    stop = StopSignal()
    ctx = ddp.init()
    run_dir = Path(args.run_dir)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randn(256, 1))
    loader = build_loader(data, ctx, batch_size=8, shuffle=True, seed=3)
    model = ddp.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1)), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = {"model": model, "optimizer": optimizer, "loader": loader}
    ckpt = Checkpointer(run_dir / "ckpt", ctx)
    step = ckpt.load_latest(**state) or 0
    resumed = step > 0
    print(f"rank {ctx.rank}/{ctx.world_size} node {ctx.node_rank} on {socket.gethostname()}: "
          f"{'resumed at step ' + str(step) if resumed else 'fresh start'}", flush=True)
    while step < args.steps:
        loader.set_epoch(loader.epoch)
        for x, y in loader:
            loss = ((model(x) - y) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == args.fail_at and ctx.rank == ctx.world_size - 1:
                print(f"rank {ctx.rank} fails on purpose at step {step}", file=sys.stderr, flush=True)
                sys.exit(1)
            if step == args.gate_at and not resumed:
                (run_dir / f"gate-rank{ctx.rank}").write_text(str(os.getpid()))
                deadline = time.monotonic() + 120
                while not stop.requested and time.monotonic() < deadline:
                    time.sleep(0.05)  # waiting for the test's preemption signal, bounded
            if stop.agreed():
                ckpt.save(step, **state)
                ckpt.wait()
                ddp.print0(f"SIGTERM: saved step {step}, exiting")
                ddp.cleanup()
                sys.exit(143)
            if step >= args.steps:
                break
        if step < args.steps:
            loader.set_epoch(loader.epoch + 1)
    if ctx.is_main:
        torch.save(ddp.unwrap(model).state_dict(), run_dir / "final.pt")
    ddp.print0(f"done at step {step}")
    ddp.cleanup()


if __name__ == "__main__":
    main()
