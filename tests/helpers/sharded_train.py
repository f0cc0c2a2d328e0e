"""The training run the sharded-checkpoint tests launch on real gloo ranks (not collected).

``run_phases(ctx, phases)`` runs each phase in turn in the same ranks: build a fresh model
(FSDP or DDP), optimizer, scheduler and resumable loader; optionally resume from a checkpoint
root; train to ``steps``, saving at ``save_at``; return (on every rank) what the test compares:
the samples each step took, RNG draws right after a save / a load, and (rank 0) the gathered
full model and optimizer state at chosen steps.

No dropout and no randomness in the loss: a run on 4 ranks then computes what a run on 2 ranks
computes (same global batches), up to the order of floating-point sums.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from distrain import ddp
from distrain.ckpt import Checkpointer
from distrain.data import build_loader

LENGTH, GLOBAL_BATCH = 96, 16  # 6 steps per epoch


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


class Net(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Indexed(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(LENGTH, 8, generator=generator)
        self.y = torch.randn(LENGTH, 1, generator=generator)

    def __len__(self) -> int:
        return LENGTH

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[index], self.y[index], index


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A copy of the gathered model and optimizer state (a collective; rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": get_model_state_dict(model, options=options),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
    # Tensors already whole on the CPU (DDP's weights, Adam's step counts) come back as the live
    # ones, which training then changes: copy.
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, state)


def draw() -> list[Any]:
    """What this rank's three RNGs give next: equal lists mean the RNG state was restored."""
    return [torch.rand(3).tolist(), float(np.random.rand()), random.random()]


def phase(ctx: ddp.Context, spec: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = ddp.wrap(Net(), ctx, strategy=spec["strategy"])
    torch.manual_seed(100 + ctx.rank)  # then each rank its own streams
    np.random.seed(200 + ctx.rank)
    random.seed(300 + ctx.rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    loader = build_loader(Indexed(), ctx, global_batch_size=GLOBAL_BATCH, seed=7, num_workers=0)
    objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": loader}
    out: dict[str, Any] = {"seen": [], "draws": {}, "states": {}}
    step = 0
    if spec.get("load"):
        step = Checkpointer(spec["load"], ctx).load_latest(**objects) or 0
        out["loaded"] = step
        out["states"][f"loaded-{step}"] = full_state(model, optimizer)
        out["draws"][f"loaded-{step}"] = draw()
    saver = None
    if spec.get("save"):
        saver = Checkpointer(spec["save"], ctx, keep_last=spec.get("keep_last", 3),
                             keep_every=spec.get("keep_every"), async_save=spec.get("async", False),
                             sharded=spec.get("sharded"))
    epoch = loader.epoch
    while step < spec["steps"]:
        loader.set_epoch(epoch)
        for x, y, index in loader:
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            out["seen"].append([step, epoch, index.tolist()])
            if saver is not None and step in spec.get("save_at", ()):
                saver.save(step, **objects, extra={"epoch": epoch})
                out["draws"][f"saved-{step}"] = draw()
            if step in spec.get("capture_at", ()):
                out["states"][str(step)] = full_state(model, optimizer)
            if step >= spec["steps"]:
                break
        epoch += 1
    # An asynchronous save may still be in flight: ddp.cleanup() finishes it (and A relies on it).
    out["final"] = full_state(model, optimizer)
    return out


def write_errors(ctx: ddp.Context, spec: dict[str, Any]) -> dict[str, Any]:
    """sharded=True on a DDP model; rank 0 cannot create the checkpoint: every rank raises,
    nothing is published; once the root is writable again a save and a load work."""
    from distrain.ckpt import CheckpointError

    torch.manual_seed(0)
    model = ddp.wrap(Net(), ctx, strategy="ddp")
    root = Path(spec["root"])
    ckpt = Checkpointer(root, ctx, sharded=True)
    ddp.barrier()
    if ctx.is_main:  # the root stops being a directory
        root.rmdir()
        root.write_text("")
    errors = []
    try:
        ckpt.save(1, model=model)
    except CheckpointError as error:
        errors.append(str(error))
    ddp.barrier()
    if ctx.is_main:
        root.unlink()
        root.mkdir()
    ddp.barrier()
    ckpt.save(2, model=model)
    expected = {k: v.clone() for k, v in ddp.unwrap(model).state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    step = Checkpointer(root, ctx).load_latest(model=model)
    restored = all(torch.equal(v, expected[k]) for k, v in ddp.unwrap(model).state_dict().items())
    return {"errors": errors, "step": step, "restored": restored}


def run_phases(ctx: ddp.Context, phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = [write_errors(ctx, spec) if spec.get("errors") else phase(ctx, spec) for spec in phases]
    ddp.cleanup()
    return results
