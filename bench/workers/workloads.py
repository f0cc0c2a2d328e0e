"""The two training workloads of the overhead benchmark, in plain torch (no distrain import).

``digits``: the digits example's CNN on sklearn's digits (same split as
``distrain.data.datasets.digits``), batch 32 per rank: tiny steps, so per-step overhead shows.
``mlp``: a 784-1024-1024-1024-10 MLP (2.9 M parameters) on fixed random data, batch 64 per rank:
larger steps with a real gradient all-reduce (11.6 MB).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

WORKLOADS = ("digits", "mlp")


class DigitsNet(nn.Module):
    """examples/digits_ddp.py's model, repeated here so the plain loop imports no distrain code."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(self.dropout(torch.flatten(x, 1)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    name: str
    model: nn.Module
    dataset: TensorDataset
    batch_size: int
    warmup: int  # steps before the clock starts
    steps: int  # timed steps


def digits_dataset() -> TensorDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    chosen = order[: int(len(labels) * 0.8)]
    return TensorDataset(images[chosen], labels[chosen])


def build(name: str, *, scale: float = 1.0) -> Workload:
    """The workload ``name``; ``scale`` shrinks the timed steps (quick runs)."""
    torch.manual_seed(0)
    if name == "digits":
        return Workload(name=name, model=DigitsNet(), dataset=digits_dataset(), batch_size=32,
                        warmup=30, steps=max(20, int(300 * scale)))
    if name == "mlp":
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(4096, 784, generator=generator),
                             torch.randint(0, 10, (4096,), generator=generator))
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        return Workload(name=name, model=model, dataset=data, batch_size=64, warmup=5,
                        steps=max(10, int(40 * scale)))
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """The timed steps of one workload on one rank: speed, and what the process paid per step
    (page faults: copy-on-write or fresh pages; switches: the kernel took the CPU away; CPU time:
    the work done, which tells a slower CPU share from more work)."""

    steps_per_s: float
    minor_faults_per_step: float
    involuntary_switches_per_step: float
    cpu_ms_per_step: float  # user + system, every thread of the rank's process
    gc_collections: int


def timed(steps: Iterator[int], work: Workload) -> Timing:
    """Drive a training generator through the warm-up, then time ``work.steps`` steps."""
    for _ in range(work.warmup):
        next(steps)
    before = resource.getrusage(resource.RUSAGE_SELF)
    collections = sum(generation["collections"] for generation in gc.get_stats())
    start = time.perf_counter()
    for _ in range(work.steps):
        next(steps)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    collections = sum(generation["collections"] for generation in gc.get_stats()) - collections
    steps.close()  # type: ignore[attr-defined]  # a generator: runs its clean-up
    return Timing(steps_per_s=work.steps / elapsed,
                  minor_faults_per_step=(after.ru_minflt - before.ru_minflt) / work.steps,
                  involuntary_switches_per_step=(after.ru_nivcsw - before.ru_nivcsw) / work.steps,
                  cpu_ms_per_step=1000 * (after.ru_utime + after.ru_stime - before.ru_utime
                                          - before.ru_stime) / work.steps,
                  gc_collections=collections)


def worker_args() -> argparse.Namespace:
    """The flags both overhead workers take."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--scale", type=float, default=1.0)
    return parser.parse_args()


def write_rates(out: Path, timings: dict[str, Timing]) -> None:
    """Rank 0's result: steps/s per workload, what each step cost the process ("usage"), and the
    intra-op threads it trained with."""
    rates: dict[str, object] = {name: timing.steps_per_s for name, timing in timings.items()}
    usage = {name: {"minor_faults_per_step": round(t.minor_faults_per_step, 2),
                    "involuntary_switches_per_step": round(t.involuntary_switches_per_step, 3),
                    "cpu_ms_per_step": round(t.cpu_ms_per_step, 4),
                    "gc_collections": t.gc_collections} for name, t in timings.items()}
    out.write_text(json.dumps(rates | {"usage": usage, "threads": torch.get_num_threads()}))
