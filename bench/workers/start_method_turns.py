"""One side of a start-method launch pair: a 2-rank plain DDP loop that trains only on its turns.

The driver (bench/start_methods.py) starts a fast-start launch and a ``--start-method spawn``
launch of this script at once and gives them turns: each rank reads one byte from its ``go``
FIFO (``go-<job>-<rank>`` in ``--sync``), trains the current workload's steps per turn
(``--chunks``) and writes one byte to its ``done`` FIFO. Between turns a side is blocked in ``read``, using no
CPU, so the two sides never train at the same time and neighbouring turns see the same machine.

Bytes from the driver: ``g`` a turn, ``n`` the next workload (or the end after the last one).
Bytes to it: ``r`` warmed up and ready, ``d`` a turn done. Rank 0 writes ``result-<job>.json``:
per workload, each turn's wall and process CPU seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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


def turns(workload: str, chunk: int, go: int, done: int) -> list[tuple[float, float]]:
    """Warm up, say ready, then train ``chunk`` steps per turn until the driver says next."""
    work = build(workload)
    model = torch.nn.parallel.DistributedDataParallel(work.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sampler = DistributedSampler(work.dataset, seed=0)
    loader = DataLoader(work.dataset, batch_size=work.batch_size, sampler=sampler)
    steps = training(model, optimizer, sampler, loader)
    for _ in range(work.warmup):
        next(steps)
    timed: list[tuple[float, float]] = []
    os.write(done, b"r")
    while os.read(go, 1) == b"g":
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(chunk):
            next(steps)
        timed.append((time.perf_counter() - start, time.process_time() - cpu))
        os.write(done, b"d")
    steps.close()
    del steps, model, optimizer
    gc.collect()
    return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sync", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--workloads", default="digits,mlp")
    parser.add_argument("--chunks", required=True, help="steps per turn, e.g. digits=60,mlp=8")
    args = parser.parse_args()
    sync = Path(args.sync)
    chunks = {name: int(steps) for name, steps in (item.split("=") for item in args.chunks.split(","))}
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # The driver holds both FIFOs open read-write, so these opens never block.
    go = os.open(sync / f"go-{args.job}-{rank}", os.O_RDONLY)
    done = os.open(sync / f"done-{args.job}-{rank}", os.O_WRONLY)
    results = {name: turns(name, chunks[name], go, done) for name in args.workloads.split(",")}
    if rank == 0:
        (sync / f"result-{args.job}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
