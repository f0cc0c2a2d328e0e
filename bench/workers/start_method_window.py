"""One side of a concurrent start-method pair: a 2-rank plain DDP loop that counts its steps in a
wall-clock window it shares with the other side.

After the warm-up, rank 0 writes ``ready-<job>`` into ``--sync``; every rank waits for the
driver's ``go`` file (a start time a moment ahead), trains ``--total`` steps, and rank 0 writes
``result-<job>.json``: steps/s within ``[start, start + --window]`` and when its last step ended.
``--total`` must outlast the window, so neither side ever trains alone in it.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn  # DDP imports it; imported after the group forms, it pins the group
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import build


def training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler: DistributedSampler,
             loader: DataLoader) -> Iterator[None]:
    """One training step per ``next()``, for as many epochs as it is driven."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            yield
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sync", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--workload", default="digits")
    parser.add_argument("--window", type=float, required=True)
    parser.add_argument("--total", type=int, required=True)
    args = parser.parse_args()
    sync = Path(args.sync)
    dist.init_process_group("gloo")
    work = build(args.workload)
    model = torch.nn.parallel.DistributedDataParallel(work.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sampler = DistributedSampler(work.dataset, seed=0)
    loader = DataLoader(work.dataset, batch_size=work.batch_size, sampler=sampler)

    steps = training(model, optimizer, sampler, loader)
    for _ in range(work.warmup):
        next(steps)
    if dist.get_rank() == 0:
        (sync / f"ready-{args.job}").write_text("ready")
    go = sync / "go"
    while not go.exists():  # both sides idle alike until the driver's start time is known
        time.sleep(0.005)
    start = float(go.read_text())
    while time.time() < start:
        time.sleep(0.001)
    ends = []
    for _ in range(args.total):
        next(steps)
        ends.append(time.time())
    if dist.get_rank() == 0:
        inside = sum(1 for end in ends if end <= start + args.window)
        (sync / f"result-{args.job}.json").write_text(
            json.dumps({"steps_per_s": inside / args.window, "last_step_end": ends[-1] - start}))
    steps.close()
    del steps, model, optimizer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
