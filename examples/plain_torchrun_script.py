"""A plain torchrun script: no distrain import, only torch.distributed, DDP and DistributedSampler.

It runs unchanged under every launcher, because they all set the same environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

    torchrun --nproc-per-node 2 examples/plain_torchrun_script.py
    distrain launch --nproc-per-node 2 examples/plain_torchrun_script.py
    distrain launch --launcher ray --num-workers 2 examples/plain_torchrun_script.py

A small MLP learns a fixed synthetic classification task; rank 0 prints the loss per epoch and
the final accuracy (about 0.89 after the default 5 epochs; the classes overlap).
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def make_data(samples: int) -> TensorDataset:
    """The same data on every rank: 4 Gaussian blobs in 16 dimensions, fixed seed."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=generator) * 0.6  # overlapping: not trivial
    labels = torch.randint(0, 4, (samples,), generator=generator)
    features = centers[labels] + torch.randn(samples, 16, generator=generator)
    return TensorDataset(features, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")  # env:// from the launcher
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)

    dataset = make_data(args.samples)
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).to(device),
        device_ids=[local_rank] if use_cuda else None,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle every epoch, the same on every rank
        total = torch.zeros(2, device=device)
        for features, labels in loader:
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(features), labels)
            loss.backward()
            optimizer.step()
            total += torch.stack([loss.detach() * len(labels), torch.tensor(len(labels), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: loss {(total[0] / total[1]).item():.4f}", flush=True)

    with torch.no_grad():
        features, labels = dataset.tensors
        correct = (model.module(features.to(device)).argmax(1) == labels.to(device)).float().mean()
    if rank == 0:
        print(f"accuracy {correct.item():.4f} on {world_size} ranks", flush=True)

    # Release DDP (it holds the process group) before destroying the group: otherwise gloo can
    # abort the process at interpreter exit ("terminate called without an active exception").
    del model, optimizer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
