"""A 2-rank DDP run checkpointing to object storage, for tests/ckpt/test_ckpt_s3.py (run by the launcher).

``python s3_train.py SPEC.json``; SPEC: a list of phases, run in turn by the same ranks, each
``{"steps": N, "save_every": k, "load": URL or null, "save": [{"root": URL, "async": bool,
"sharded": bool}, ...], "kill_at": step or null, "out": path, "wait": bool (default true),
"keep_on": [ranks]}``. A phase builds the model,
resumes from ``load`` (if given), trains to ``steps`` saving every ``save_every`` steps into every
``save`` root, and SIGKILLs itself (every rank) right after the saves of step ``kill_at`` return
(an asynchronous upload may be in flight). Rank 0 writes ``{"loaded": step, "weights": ...}``
to ``out`` with ``torch.save``. With ``"wait": false`` the phase ends without ``wait()``: its
Checkpointers go out of scope with a save maybe in flight (except on the ranks in ``keep_on``,
which keep them until the end), and ``ddp.cleanup()`` must finish it (with
``S3_TRAIN_NO_CLEANUP=1`` the script never calls it: the exit handler does).
Each step draws its batch from the global RNG, so resuming exactly needs the RNG restored too.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distrain import ddp
from distrain.ckpt import Checkpointer


def main() -> None:
    ctx = ddp.init("gloo")
    kept = []
    for spec in json.loads(Path(sys.argv[1]).read_text()):
        savers = phase(ctx, spec)
        if ctx.rank in spec.get("keep_on", []):
            kept.extend(savers)
    gc.collect()  # the other Checkpointers are gone now
    if os.environ.get("S3_TRAIN_NO_CLEANUP") != "1":  # else: distrain's exit handler runs it
        ddp.cleanup()


def phase(ctx: ddp.Context, spec: dict[str, Any]) -> list[Checkpointer]:
    torch.manual_seed(0)
    model = ddp.wrap(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)), ctx, strategy="ddp")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(100 + ctx.rank)
    loaded = 0
    if spec.get("load"):
        loaded = Checkpointer(spec["load"], ctx).load_latest(model=model, optimizer=optimizer) or 0
    savers = [Checkpointer(s["root"], ctx, keep_last=2, async_save=s["async"], sharded=s["sharded"])
              for s in spec.get("save", [])]
    for step in range(loaded + 1, spec["steps"] + 1):
        x, y = torch.randn(4, 8), torch.randn(4, 1)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % spec["save_every"] == 0:
            for saver in savers:
                saver.save(step, model=model, optimizer=optimizer)
        if step == spec.get("kill_at"):
            os.kill(os.getpid(), signal.SIGKILL)
    weights = {k: v.detach().clone() for k, v in ddp.unwrap(model).state_dict().items()}
    if ctx.is_main:
        torch.save({"loaded": loaded, "weights": weights}, spec["out"])
    if spec.get("wait", True):
        for saver in savers:
            saver.wait()
    return savers


if __name__ == "__main__":
    main()
