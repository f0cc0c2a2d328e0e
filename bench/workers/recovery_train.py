"""The run the recovery benchmark kills (bench/snapshots.py): the MLP workload under DDP.

``--mode snapshot``: distrain, a snapshot after every step (``Checkpointer(snapshot_every=1)``)
and a durable checkpoint every ``--save-every`` steps. ``--mode torchsave``: plain torch only (no
distrain import), what a torchrun user writes: rank 0 ``torch.save``s model and optimizer every
``--save-every`` steps and every rank ``torch.load``s the file at start.

On the first attempt rank ``--kill-rank`` writes ``out/kill.json`` (time, step) and SIGKILLs
itself after step ``--kill-at`` (if given). On a later attempt rank 0 writes ``out/resumed.json``:
the step it resumed from, the time its first step after that completed, and when it started
(``started``: the script's first line), had its process group (``group``), had built the model
and optimizer (``built``) and had loaded the state (``loaded``). Every rank writes its
pid and the time its loop starts to ``out/pids/attempt<A>-rank<R>`` (the goodput harness kills
from those and sizes its runs by them); rank 0 writes ``out/done.json`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import build


def write_json(path: Path, value: dict[str, Any]) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(value))
    os.replace(temp, path)


class TorchSave:
    """The plain torch side: one file, rank 0 writes it, everyone reads it."""

    def __init__(self, root: Path, rank: int) -> None:
        self.file, self.rank = root / "last.pt", rank
        root.mkdir(parents=True, exist_ok=True)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        if not self.file.exists():
            return 0
        state = torch.load(self.file, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.rank == 0:
            temp = self.file.with_name(".last.pt.tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, temp)
            os.replace(temp, self.file)
        dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("snapshot", "torchsave"), required=True)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    marks = {"started": time.time()}  # where a recovery's time goes (see resumed.json)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    work = build("mlp")
    if args.mode == "snapshot":
        from distrain import ddp
        from distrain.ckpt import Checkpointer

        ctx = ddp.init()
        marks["group"] = time.time()
        rank = ctx.rank
        model: nn.Module = ddp.wrap(work.model, ctx)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        ckpt = Checkpointer(args.ckpt, ctx, keep_last=1, snapshot_every=1)
        marks["built"] = time.time()
        step = ckpt.load_latest(model=model, optimizer=optimizer) or 0
    else:
        # torchrun keeps its store across restarts: without keys private to this attempt the new
        # group would read the dead group's addresses (see distrain.ddp's attempt store)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
        dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt_{attempt}", store),
                                rank=rank, world_size=world)
        marks["group"] = time.time()
        model = DistributedDataParallel(work.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        plain = TorchSave(args.ckpt, rank)
        marks["built"] = time.time()
        step = plain.load(model.module, optimizer)
    marks["loaded"] = time.time()
    (args.out / "pids").mkdir(parents=True, exist_ok=True)
    write_json(args.out / "pids" / f"attempt{attempt}-rank{rank}", {"pid": os.getpid(), "time": time.time()})
    resumed_from, first_done = step, attempt == 0
    batch, world = work.batch_size, dist.get_world_size()
    data, labels = work.dataset.tensors
    while step < args.steps:
        start = (step * world + rank) * batch % (len(labels) - batch)
        loss = F.cross_entropy(model(data[start:start + batch]), labels[start:start + batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if not first_done and rank == 0:
            write_json(args.out / "resumed.json", {"step": resumed_from, "time": time.time(), **marks})
            first_done = True
        if args.mode == "snapshot":
            ckpt.snapshot(step, model=model, optimizer=optimizer)
            if step % args.save_every == 0:
                ckpt.save(step, model=model, optimizer=optimizer)
        elif step % args.save_every == 0:
            plain.save(step, model.module, optimizer)
        if attempt == 0 and rank == args.kill_rank and step == args.kill_at:
            write_json(args.out / "kill.json", {"step": step, "time": time.time()})
            os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        write_json(args.out / "done.json", {"time": time.time(), "attempt": attempt})
    if args.mode == "snapshot":
        ddp.cleanup()
    else:
        del model, optimizer
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
