"""The training run the fault trials interrupt (bench/fault_trials.py, tests/ckpt/test_fault_trials.py).

A dropout MLP under DDP on a shuffled resumable loader, SGD with momentum and a step schedule;
every rank draws its own dropout masks, so restoring a wrong RNG state or batch shows in the
weights. It resumes from the newest checkpoint in ``--ckpt``, saves every ``--save-every`` steps
(``--async-save``: in the background) and at the end, and on rank 0 writes ``final.pt`` (model +
optimizer state) into ``--out``. What the harness needs to aim its faults:

* ``out/pids/attempt<A>-rank<R>`` (written atomically when the rank starts) hold the pid;
* SIGTERM (the launcher forwards it on preemption) sets a flag (``distrain.preemption.StopSignal``);
  all ranks agree on it at the next step (one tiny all-reduce per step), save a checkpoint there,
  write ``out/preempted`` and exit;
* ``--ballast-at N`` (first attempt only) adds ``--ballast-mb`` of zeros to step N's checkpoint, so
  writing it takes long enough for the harness to kill a rank mid-checkpoint every time;
* ``--snapshot-every N`` keeps an in-memory snapshot every N steps (``ckpt.snapshot``);
  ``--kill-rank R --kill-at N`` (first attempt only) makes rank R SIGKILL itself right after
  step N's snapshot started (its copy is then usually still in flight);
* ``--strategy fsdp`` shards the model (FSDP2): sharded durable checkpoints, snapshots of each
  rank's shard; ``final.pt`` then holds the gathered state (optimizer state keyed by name);
* ``--hang-rank R --hang-at N`` makes rank R block forever before step N's collective (a stuck
  rank): the others must fail by the collective timeout ``--timeout`` (``ddp.init(timeout=...)``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from distrain import ddp
from distrain.ckpt import Checkpointer
from distrain.data import build_loader
from distrain.preemption import StopSignal


def write_atomic(path: Path, text: str) -> None:
    """A reader (the harness) sees the whole file or none: write aside, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(text)
    os.replace(temp, path)


def ballast(megabytes: int) -> nn.Module:
    """Zeros to make one checkpoint slow to write (saved like any module, never loaded)."""
    module = nn.Module()
    module.register_buffer("zeros", torch.zeros(megabytes * 2**18))
    return module


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, *, fsdp: bool) -> dict[str, object]:
    """Model and optimizer state, gathered in full under FSDP (optimizer state keyed by name)."""
    if not fsdp:
        return {"model": ddp.unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=2, help="0: no durable checkpoint at all")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--width", type=int, default=512, help="hidden width (checkpoint size)")
    parser.add_argument("--timeout", type=float, default=None, help="collective timeout, seconds")
    parser.add_argument("--ballast-at", type=int, default=None, help="a slow checkpoint at this step")
    parser.add_argument("--ballast-mb", type=int, default=160)
    parser.add_argument("--snapshot-every", type=int, default=None)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--hang-rank", type=int, default=None)
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--strategy", default="auto", help="ddp.wrap's strategy (fsdp: sharded)")
    args = parser.parse_args()

    # A stuck rank keeps SIGTERM's default (die at once), as a script without handlers would.
    stop = StopSignal(signals=() if args.hang_rank is not None else (signal.SIGTERM,))
    ctx = ddp.init(timeout=args.timeout)
    out = Path(args.out)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    write_atomic(out / "pids" / f"attempt{attempt}-rank{ctx.rank}", str(os.getpid()))

    torch.manual_seed(1000 + ctx.rank)  # each rank its own dropout stream
    data = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(256, 64, generator=data), torch.randint(0, 8, (256,), generator=data))
    loader = build_loader(dataset, ctx, batch_size=8, shuffle=True, seed=3, num_workers=0)
    model = ddp.wrap(nn.Sequential(nn.Linear(64, args.width), nn.ReLU(), nn.Dropout(0.3),
                                   nn.Linear(args.width, args.width), nn.ReLU(), nn.Dropout(0.3),
                                   nn.Linear(args.width, 8)), ctx, strategy=args.strategy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.7)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": loader}
    ckpt = Checkpointer(args.ckpt, ctx, keep_last=2, async_save=args.async_save,
                        snapshot_every=args.snapshot_every)
    step = ckpt.load_latest(**state) or 0
    if step:
        ddp.print0(f"resumed from {'step' if ckpt.path else 'snapshot step'} {step}")

    epoch = loader.epoch
    while step < args.steps:
        loader.set_epoch(epoch)
        for x, y in loader:
            if ctx.rank == args.hang_rank and step + 1 == args.hang_at:
                write_atomic(out / "hang.json", json.dumps({"rank": ctx.rank, "time": time.time()}))
                threading.Event().wait()  # stuck: never reaches the next collective
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if args.snapshot_every:
                ckpt.snapshot(step, **state)
            if attempt == 0 and ctx.rank == args.kill_rank and step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop.agreed():
                ckpt.save(step, **state)
                ckpt.wait()
                if ctx.is_main:
                    write_atomic(out / "preempted", json.dumps({"step": step, "time": time.time()}))
                ddp.cleanup()
                return
            if args.save_every and (step % args.save_every == 0 or step == args.steps):
                slow = attempt == 0 and step == args.ballast_at
                ckpt.save(step, **state, **({"ballast": ballast(args.ballast_mb)} if slow else {}))
            if step >= args.steps:
                break
        epoch += 1
    ckpt.wait()
    final = full_state(model, optimizer, fsdp=args.strategy == "fsdp")  # FSDP: a collective
    if ctx.is_main:
        temp = out / f".final.{os.getpid()}"
        torch.save(final, temp)
        os.replace(temp, out / "final.pt")
    ddp.cleanup()


if __name__ == "__main__":
    main()
