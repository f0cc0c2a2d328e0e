"""Overhead benchmark, hand-written side: the same workloads, raw torch.distributed under torchrun.

What a user writes without distrain: ``init_process_group``, DDP, ``DistributedSampler`` with a
DataLoader, and every 10 steps the same scalars the distrain side logs, computed by hand: the loss
and throughput averaged over ranks, the gradient norm, the lr, the peak resident memory over
ranks (two all-reduces), written to TensorBoard (tensorboardX) by rank 0. The same work, so the
ratio measures distrain's own overhead. No distrain import. Rank 0 writes
``{"<workload>": steps_per_s, ...}`` to ``--out``.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from tensorboardX import SummaryWriter
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import Timing, Workload, build, timed, worker_args, write_rates


def log_scalars(writer: SummaryWriter | None, model: torch.nn.Module, loss: torch.Tensor,
                optimizer: torch.optim.Optimizer, epoch: int, step: int, global_batch: int,
                last: dict[str, float]) -> None:
    """The scalars distrain's ``train_scalars`` logs; ``last``: when and at which step the
    previous point was logged (updated)."""
    now = time.perf_counter()
    seconds = (now - last["time"]) / max(step - last["step"], 1)
    last.update(time=now, step=step)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    means = torch.tensor([loss.item(), norm.item(), global_batch / seconds, seconds], dtype=torch.float64)
    dist.all_reduce(means)
    means /= dist.get_world_size()
    rss = torch.tensor([psutil.Process().memory_info().rss / 2**20], dtype=torch.float64)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if writer is not None:
        names = ("train/loss", "train/grad_norm", "perf/samples_per_s", "perf/step_time_s")
        for name, value in zip(names, means.tolist()):
            writer.add_scalar(name, value, step)
        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
        writer.add_scalar("train/epoch", epoch, step)
        writer.add_scalar("sys/rss_mb", rss.item(), step)


def training(work: Workload, rank: int, world_size: int, log_dir: Path) -> Iterator[int]:
    """The training loop of ``work``, one step per ``next()`` (yields the step number), for as
    many epochs as it is driven."""
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        work.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(work.dataset, batch_size=work.batch_size, sampler=sampler)
    model = DistributedDataParallel(work.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    writer = SummaryWriter(str(log_dir / work.name)) if rank == 0 else None
    step, epoch = 0, 0
    last = {"time": time.perf_counter(), "step": 0.0}
    try:
        while True:
            sampler.set_epoch(epoch)
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                if step % 10 == 0:
                    log_scalars(writer, model, loss, optimizer, epoch, step, len(y) * world_size, last)
                yield step
            epoch += 1
    finally:
        if writer is not None:
            writer.close()
        del model, optimizer  # DDP holds the group: release it before destroy (gloo teardown abort)
        gc.collect()


def measure(name: str, rank: int, world_size: int, log_dir: Path, scale: float) -> Timing:
    """Steps/s of the timed steps, after the warm-up, and what they cost the process."""
    work = build(name, scale=scale)
    return timed(training(work, rank, world_size, log_dir), work)


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
