"""The five-call script with one import and no ``ctx`` anywhere; writes rank, loss and weights."""

import json
import os
from pathlib import Path

import torch

import distrain

out = Path(os.environ["OUT_DIR"])
ctx = distrain.init()
torch.manual_seed(0)
model = distrain.wrap(torch.nn.Linear(4, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = torch.utils.data.TensorDataset(torch.arange(64.0).reshape(16, 4) / 64, torch.ones(16, 1))
loader = distrain.build_loader(data, batch_size=4, shuffle=False)
ckpt = distrain.Checkpointer(out / "ckpt")
tb = distrain.TBLogger(out / "tb")
step = ckpt.load_latest(model=model, optimizer=optimizer, loader=loader) or 0
for x, y in loader:
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    step += 1
    tb.scalar("train/loss", distrain.all_reduce_mean(loss).item(), step)
ckpt.save(step, model=model, optimizer=optimizer, loader=loader)
weight = distrain.unwrap(model).weight.detach().flatten().tolist()
record = {"world": ctx.world_size, "step": step, "weight": weight}
(out / f"rank-{ctx.rank}.json").write_text(json.dumps(record))
distrain.print0(f"done at step {step}")
distrain.cleanup()
