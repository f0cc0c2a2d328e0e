"""Overhead benchmark, hand-written side: the same workloads, raw torch.distributed under torchrun.

What a user writes without distrain: ``init_process_group``, DDP, ``DistributedSampler`` with a
DataLoader, and rank 0 logging the loss to TensorBoard (tensorboardX) every 10 steps. No
distrain import. Rank 0 writes ``{"<workload>": steps_per_s, ...}`` to ``--out``.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tensorboardX import SummaryWriter
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import build, worker_args, write_rates


def measure(name: str, rank: int, world_size: int, log_dir: Path, scale: float) -> float:
    work = build(name, scale=scale)
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        work.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(work.dataset, batch_size=work.batch_size, sampler=sampler)
    model = DistributedDataParallel(work.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    writer = SummaryWriter(str(log_dir / name)) if rank == 0 else None
    step, epoch, start = 0, 0, 0.0
    while step < work.warmup + work.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 10 == 0 and writer is not None:
                writer.add_scalar("train/loss", loss.item(), step)
            if step == work.warmup:
                start = time.perf_counter()
            if step == work.warmup + work.steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - start
    if writer is not None:
        writer.close()
    del model, optimizer  # DDP holds the group: release it before destroy (gloo teardown abort)
    gc.collect()
    return work.steps / elapsed


def main() -> None:
    args = worker_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    rates = {name: measure(name, rank, world_size, out.parent / f"tb-{out.stem}", args.scale)
             for name in args.workloads.split(",")}
    if rank == 0:
        write_rates(out, rates)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
