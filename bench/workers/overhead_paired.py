"""Overhead benchmark, paired: both loops live in the same two processes, driven in turns.

A process's speed on this shared VM varies from launch to launch (a pure compute loop, same
command, measured 350 to 470 steps/s across launches) and drifts within a launch over seconds,
which swamps a 1 % difference when each side is its own launch. Here one 2-rank launch builds
the hand-written loop (``overhead_plain.training``) and the distrain loop
(``overhead_distrain.training``) side by side, warms both up, then runs them in alternating
chunks of ``--chunk`` steps (order flipped every pair), ``--pairs`` pairs per workload. Each pair
gives a ratio of steps/s; the drift hits both halves of a pair alike.
Rank 0 writes ``{"<workload>": [[distrain_s, plain_s] per pair, ...], ...}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead_distrain
import overhead_plain
from workloads import WORKLOADS, build

from distrain import ddp


def _run(steps: Iterator[int], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        next(steps)
    return time.perf_counter() - start


def compare(name: str, ctx: ddp.Context, logs: Path, *, pairs: int, chunk: int) -> list[list[float]]:
    """Seconds per chunk, ``[distrain, plain]`` for each pair."""
    distrain_work, plain_work = build(name), build(name)  # each side its own model, same seed
    distrain = overhead_distrain.training(distrain_work, ctx, logs / "distrain")
    plain = overhead_plain.training(plain_work, ctx.rank, ctx.world_size, logs / "plain")
    _run(distrain, distrain_work.warmup)
    _run(plain, plain_work.warmup)
    seconds = []
    for pair in range(pairs):
        if pair % 2 == 0:
            plain_s, distrain_s = _run(plain, chunk), _run(distrain, chunk)
        else:
            distrain_s, plain_s = _run(distrain, chunk), _run(plain, chunk)
        seconds.append([distrain_s, plain_s])
    distrain.close()  # type: ignore[attr-defined]
    plain.close()  # type: ignore[attr-defined]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--chunk", default="digits=60,mlp=10", help="steps per chunk, per workload")
    args = parser.parse_args()
    chunks = {name: int(steps) for name, steps in (item.split("=") for item in args.chunk.split(","))}
    ctx = ddp.init()
    out = Path(args.out)
    result = {name: compare(name, ctx, out.parent / f"tb-{out.stem}" / name, pairs=args.pairs,
                            chunk=chunks[name])
              for name in args.workloads.split(",")}
    if ctx.is_main:
        out.write_text(json.dumps(result))
    dist.barrier()
    ddp.cleanup()


if __name__ == "__main__":
    main()
