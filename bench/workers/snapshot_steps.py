"""Step time with a snapshot after every step vs without, paired in one 2-rank launch.

One DDP loop per workload; it runs in alternating chunks of ``--chunk`` steps, with
``ckpt.snapshot(step, ...)`` after every step (or every ``--snapshot-every``-th, chunks rounded up
to a multiple of it) or without (order flipped every pair), so load drift on the machine hits both
halves of a pair alike. A chunk with snapshots includes waiting for its last copy. Rank 0 writes
``{"<workload>": {"pairs": [[with_s, without_s], ...], "cpu_pairs": [...], "state_mb": ...}}`` to
``--out``: wall seconds, and rank 0's CPU seconds (all its threads), which a machine shared with
other jobs distorts less. Workloads: ``digits`` and ``mlp`` (bench/workers/workloads.py) and
``large``: a 195 MB MLP (:func:`large`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import Workload, build

from distrain import ddp
from distrain.ckpt import Checkpointer
from distrain.ckpt.snapshot import remove
from distrain.data import build_loader


def large() -> Workload:
    """A 51 M parameter (195 MB in float32) MLP on random data, batch 8 per rank."""
    torch.manual_seed(0)
    width, generator = 3072, torch.Generator().manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(512, width), nn.ReLU()]
    for _ in range(5):
        layers += [nn.Linear(width, width), nn.ReLU()]
    data = TensorDataset(torch.randn(512, 512, generator=generator),
                         torch.randint(0, 10, (512,), generator=generator))
    return Workload(name="large", model=nn.Sequential(*layers, nn.Linear(width, 10)), dataset=data,
                    batch_size=8, warmup=3, steps=0)


def training(work: Workload, ctx: ddp.Context, ckpt: Checkpointer, snap: list[int]) -> Iterator[int]:
    """The loop; ``snap``: [interval (0: no snapshots), steps into the chunk]. Snapshots fall on
    the chunk's first step and every interval after, so a background copy overlaps the steps
    after it as in a real run, rather than being waited for by the chunk's end."""
    loader = build_loader(work.dataset, ctx, batch_size=work.batch_size, seed=0, num_workers=0)
    model = ddp.wrap(work.model, ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step, epoch = 0, 0
    while True:
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if snap[0] and snap[1] % snap[0] == 0:
                ckpt.snapshot(step, model=model, optimizer=optimizer, loader=loader)
            snap[1] += 1
            yield step
        epoch += 1


def compare(work: Workload, ctx: ddp.Context, root: Path, *, pairs: int, chunk: int,
            every: int = 1) -> dict[str, Any]:
    ckpt = Checkpointer(root / work.name, ctx, snapshot_every=1)  # training() picks the steps
    chunk = -(-chunk // every) * every  # a multiple of the interval: as many snapshots in every chunk
    snap = [0, 0]
    steps = training(work, ctx, ckpt, snap)

    def run(with_snapshots: bool) -> tuple[float, float]:
        """Wall and CPU seconds (this process, all threads) of one chunk."""
        snap[:] = [every if with_snapshots else 0, 0]
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(chunk):
            next(steps)
        ckpt.wait()
        return time.perf_counter() - start, time.process_time() - cpu

    run(True)  # warm-up, both ways (the first snapshot allocates its slots)
    run(False)
    seconds, cpu = [], []
    for pair in range(pairs):
        if pair % 2 == 0:
            without, with_ = run(False), run(True)
        else:
            with_, without = run(True), run(False)
        seconds.append([with_[0], without[0]])
        cpu.append([with_[1], without[1]])
    size = sum(p.numel() * p.element_size() for p in work.model.parameters())
    steps.close()  # type: ignore[attr-defined]
    ckpt.wait()
    remove(root / work.name)  # this workload's snapshots: the next one takes the room
    return {"pairs": seconds, "cpu_pairs": cpu, "state_mb": round(2 * size / 2**20, 1)}  # weights + momentum


def per_workload(spec: str, names: list[str]) -> dict[str, int]:
    """``"digits=40,mlp=10"`` -> ``{"digits": 40, "mlp": 10}``; a bare number is for every workload."""
    if "=" not in spec:
        return dict.fromkeys(names, int(spec))
    return {name: int(value) for name, value in (item.split("=") for item in spec.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--workloads", default="digits,mlp,large")
    parser.add_argument("--pairs", default="digits=200,mlp=20,large=20",
                        help="chunk pairs per workload, or one number for all")
    parser.add_argument("--chunk", default="digits=40,mlp=10,large=3", help="steps per chunk")
    parser.add_argument("--snapshot-every", default="1",
                        help="snapshot_every of the chunks with snapshots, or one per workload "
                             "(digits=8,mlp=12): to check an interval")
    args = parser.parse_args()
    names = args.workloads.split(",")
    chunks, pairs = per_workload(args.chunk, names), per_workload(args.pairs, names)
    every = per_workload(args.snapshot_every, names)
    ctx = ddp.init()
    result = {name: compare(large() if name == "large" else build(name), ctx, Path(args.ckpt),
                            pairs=pairs[name], chunk=chunks[name], every=every[name])
              for name in names}
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    ddp.cleanup()


if __name__ == "__main__":
    main()
