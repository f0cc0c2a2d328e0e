"""One script, several GPU checks (chosen by argv[1]), run under ``distrain launch`` or plain python.

Each check prints ``RESULT <json>`` on rank 0 for the test to read.
"""

from __future__ import annotations

import json
import os
import sys

import torch

# Before anything else: a worker forked from the fast-start server must find CUDA untouched.
STARTED_CLEAN = {"initialized": torch.cuda.is_initialized(), "bad_fork": torch.cuda._is_in_bad_fork()}

from torch import nn  # noqa: E402

from distrain import ddp  # noqa: E402
from distrain.ckpt import Checkpointer  # noqa: E402


def report(value: object) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(value), flush=True)


def nccl_world() -> None:
    ctx = ddp.init()
    value = torch.tensor([float(ctx.rank + 1)], device=ctx.device)
    torch.distributed.all_reduce(value)
    report({"backend": ctx.backend, "device": str(ctx.device), "sum": value.item(),
            "world": ctx.world_size, "mean": ddp.all_reduce_mean(2.5), **STARTED_CLEAN})
    ddp.cleanup()


def pinning() -> None:
    ctx = ddp.init(backend="gloo")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    line = {"rank": ctx.rank, "local_rank": ctx.local_rank, "device": str(ctx.device),
            "current": torch.cuda.current_device(), "uuid": str(props.uuid),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
    print("PIN " + json.dumps(line), flush=True)
    ddp.cleanup()


def _amp_model(ctx: ddp.Context) -> tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = ddp.wrap(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)), ctx)
    return model, torch.optim.SGD(model.parameters(), lr=1e-4), ddp.grad_scaler(ctx)


def amp_resume() -> None:
    """Train to ``total`` steps, checkpointing at every step; stop early at ``stop`` (argv)."""
    root, total, stop = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ctx = ddp.init()
    model, optimizer, scaler = _amp_model(ctx)
    ckpt = Checkpointer(root, ctx, keep_last=2)
    step = ckpt.load_latest(model=model, optimizer=optimizer, scaler=scaler) or 0
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 32, generator=generator) * 10 for _ in range(total)]
    while step < min(total, stop):
        x = batches[step].to(ctx.device)
        with ddp.autocast(ctx):
            loss = model(x).float().pow(2).mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        ckpt.save(step, model=model, optimizer=optimizer, scaler=scaler)
    params = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    report({"step": step, "scale": scaler.get_scale(), "enabled": scaler.is_enabled(),
            "params": params.tolist(), "dtype_seen": str(loss.dtype)})
    ddp.cleanup()


def data_parallel() -> None:
    ctx = ddp.init()
    model = ddp.wrap(nn.Linear(8, 2), ctx, strategy="dp")
    out = model(torch.randn(4 * max(1, torch.cuda.device_count()), 8, device=ctx.device))
    report({"type": type(model).__name__, "device_ids": list(getattr(model, "device_ids", [])),
            "out_device": str(out.device), "count": torch.cuda.device_count()})


def fsdp() -> None:
    root = sys.argv[2]
    ctx = ddp.init()
    torch.manual_seed(0)
    model = ddp.wrap(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)), ctx, strategy="fsdp",
                     min_block_params=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    x = torch.randn(64, 16, device=ctx.device)
    y = x.sum(dim=1, keepdim=True)
    for _ in range(20):
        loss = (model(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    ckpt = Checkpointer(root, ctx)
    ckpt.save(20, model=model, optimizer=optimizer)
    ckpt.wait()
    before = model(x).detach().cpu()
    torch.manual_seed(1)
    fresh = ddp.wrap(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)), ctx, strategy="fsdp",
                     min_block_params=1)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    step = ckpt.load_latest(model=fresh, optimizer=fresh_opt)
    after = fresh(x).detach().cpu()
    param = next(iter(model.parameters()))
    report({"first": losses[0], "last": losses[-1], "step": step, "same": bool(torch.equal(before, after)),
            "param_type": type(param).__name__, "param_device": str(param.device)})
    ddp.cleanup()


def async_ckpt() -> None:
    root = sys.argv[2]
    ctx = ddp.init()
    model = nn.Linear(256, 256).to(ctx.device)
    saved = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ckpt = Checkpointer(root, ctx, async_save=True)
    ckpt.save(1, model=model)
    with torch.no_grad():  # changes after save() returned must not reach the checkpoint
        for p in model.parameters():
            p.add_(1.0)
    ckpt.wait()
    fresh = nn.Linear(256, 256).to(ctx.device)
    step = Checkpointer(root, ctx).load_latest(model=fresh)
    same = all(torch.equal(fresh.state_dict()[k].cpu(), v) for k, v in saved.items())
    report({"step": step, "same": same, "device": str(next(fresh.parameters()).device)})
    ddp.cleanup()


if __name__ == "__main__":
    {"nccl": nccl_world, "pin": pinning, "amp": amp_resume, "dp": data_parallel, "fsdp": fsdp,
     "async": async_ckpt}[sys.argv[1]]()
