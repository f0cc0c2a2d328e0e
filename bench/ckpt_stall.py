"""Checkpoint stall, training time lost and write throughput for a ~200 MB training state.

    python bench/ckpt_stall.py                  # 5 interleaved repetitions (15 of the segments)
    python bench/ckpt_stall.py --quick          # 3 repetitions (9 of the segments)
    python bench/ckpt_stall.py --dir /mnt/fast --reps 7

The state: an MLP of 25.5 M parameters (102 MB) and its SGD momentum (102 MB). One process, a
real training loop on 2 CPU threads.

* **Stall**: a segment of training steps is run three ways, interleaved: with no save, with a
  blocking ``torch.save`` of model + optimizer state after the first step, and with
  ``Checkpointer(async_save=True).save(...)`` there (its CPU snapshot is the only pause; the
  write, digest and fsync run on a low-priority thread) and ``ckpt.wait()`` at the end of the
  segment. "Training stopped" is the time the loop sat in ``save`` (and in that final
  ``wait``); goal: async <= 0.10 of blocking. "Training time lost" is the segment's extra wall
  time over the no-save segment next to it: it also counts what the background writer takes
  from training when both share the same cores (this CPU-only machine), which is what a user
  pays; goal: async <= 0.5 of blocking (ratio of the medians). A segment's wall time varies by
  more than a save costs, so the segments run three times as many repetitions as the rest.
* **CPU**: the CPU seconds (user + system, every thread of the process) of one save with
  nothing else running (async ``save`` + ``wait`` against ``torch.save``, interleaved): what a
  save takes from training on busy cores, little moved by other load on the machine, where the
  wall-time rows are. (The CPU each save added to its training segment is kept in the results
  as ``extra_cpu_s``; other load moves the training's own CPU time too much to print it.)
* **Throughput**: a synchronous ``Checkpointer.save`` (staging directory, fsync of every file,
  hashes, manifest, atomic rename) against ``dd ... conv=fsync`` of the same files into the same
  directory, interleaved. Goal: >= 0.8 of dd.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

if not __package__:  # run as a script: python bench/ckpt_stall.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import goal_mark, interleave, load_note, median, table
from distrain import ddp
from distrain.ckpt import Checkpointer

HIDDEN = 3400  # 2 x 2048 x 3400 + 3400^2 = 25.5 M parameters: 102 MB, 204 MB with momentum
STALL_GOAL, LOST_GOAL, THROUGHPUT_GOAL = 0.10, 0.5, 0.8
SEGMENT_REPS = 3  # segment triples per repetition: their wall time is the noisiest figure


def build_state() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, 2048))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    return model, optimizer


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor))
    return weights + buffers


def train_segment(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int,
                  save: Callable[[], None] | None, finish: Callable[[], None] | None) -> tuple[float, float]:
    """(segment seconds, seconds the loop was blocked in the save call and the final wait)."""
    x, y = torch.randn(32, 2048), torch.randn(32, 2048)
    blocked = 0.0
    start = time.perf_counter()
    for step in range(steps):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 0 and save is not None:
            before = time.perf_counter()
            save()
            blocked += time.perf_counter() - before
    if finish is not None:
        before = time.perf_counter()
        finish()
        blocked += time.perf_counter() - before
    return time.perf_counter() - start, blocked


def stall(root: Path, reps: int, steps: int) -> dict[str, Any]:
    model, optimizer = build_state()
    train_segment(model, optimizer, 2, None, None)  # momentum buffers exist, caches warm
    ctx = ddp.init()
    ckpt = Checkpointer(root / "async", ctx, keep_last=1, async_save=True)
    counter = iter(range(1, 10_000))

    def blocking() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, root / "blocking.pt")

    sides: dict[str, tuple[Callable[[], None] | None, Callable[[], None] | None]] = {
        "none": (None, None),
        "blocking": (blocking, None),
        "async": (lambda: ckpt.save(next(counter), model=model, optimizer=optimizer), ckpt.wait),
    }
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    blocked: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for rep in range(reps):
        for name in names[rep % 3:] + names[:rep % 3]:
            before = time.process_time()  # every thread of this process: the writer's too
            total, paused = train_segment(model, optimizer, steps, *sides[name])
            cpu[name].append(time.process_time() - before)
            seconds[name].append(total)
            blocked[name].append(paused)
    saves = ("blocking", "async")
    # How long training stopped: the loop sat in save() (and, async, in the final wait()).
    ratio = median([a / b for a, b in zip(blocked["async"], blocked["blocking"])])
    # What the save cost the segment in wall time, background work included (noisier).
    slowdown = {name: [s - base for s, base in zip(seconds[name], seconds["none"])] for name in saves}
    # Ratio of the medians; nan when the blocking save cost nothing measurable (noise won).
    lost = median(slowdown["async"]) / median(slowdown["blocking"]) if median(slowdown["blocking"]) > 0 \
        else float("nan")
    # CPU seconds the save added to the segment (user + system, all threads): what it takes from
    # training when the cores are busy, and, unlike wall time, hardly moved by other load.
    extra_cpu = {name: [c - base for c, base in zip(cpu[name], cpu["none"])] for name in saves}
    blocking_cpu = median(extra_cpu["blocking"])
    cpu_ratio = median(extra_cpu["async"]) / blocking_cpu if blocking_cpu > 0 else float("nan")
    return {"lost_ratio": round(lost, 3), "cpu_s": cpu, "extra_cpu_s": extra_cpu,
            "median_extra_cpu_s": {k: round(median(extra_cpu[k]), 3) for k in saves},
            "cpu_ratio": round(cpu_ratio, 3), "bytes": state_bytes(model, optimizer), "steps": steps,
            "segment_s": seconds,
            "blocked_s": {k: blocked[k] for k in saves}, "slowdown_s": slowdown,
            "median_blocked_s": {k: round(median(blocked[k]), 3) for k in saves},
            "median_slowdown_s": {k: round(median(slowdown[k]), 3) for k in saves},
            "median_segment_s": round(median(seconds["none"]), 3), "ratio": round(ratio, 3)}


def save_cpu(root: Path, reps: int) -> dict[str, Any]:
    """CPU seconds of one save with nothing else running in the process (user + system, every
    thread: the async writer's too; the kernel's writeback threads are not counted). Interleaved
    async ``save`` + ``wait`` and blocking ``torch.save``: the work a save takes from training on
    busy cores, whatever else loads the machine."""
    model, optimizer = build_state()
    train_segment(model, optimizer, 2, None, None)
    ckpt = Checkpointer(root / "cpu", ddp.init(), keep_last=1, async_save=True)
    counter = iter(range(1, 10_000))

    def cpu_of(save: Callable[[], None]) -> Callable[[], float]:
        def timed() -> float:
            before = time.process_time()
            save()
            return time.process_time() - before
        return timed

    def blocking() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, root / "cpu.pt")

    def background() -> None:
        ckpt.save(next(counter), model=model, optimizer=optimizer)
        ckpt.wait()

    times = interleave(reps, {"async": cpu_of(background), "blocking": cpu_of(blocking)})
    return {"cpu_s": times, "median_cpu_s": {k: round(median(v), 3) for k, v in times.items()},
            "ratio": round(median(times["async"]) / median(times["blocking"]), 3)}


def throughput(root: Path, reps: int) -> dict[str, Any]:
    model, optimizer = build_state()
    train_segment(model, optimizer, 1, None, None)
    ctx = ddp.init()
    Checkpointer(root / "source", ctx).save(1, model=model, optimizer=optimizer)  # dd copies these
    source = root / "source" / "step-00000001"
    files = sorted(p for p in source.iterdir() if p.is_file())
    written = sum(p.stat().st_size for p in files)

    def save() -> float:
        target = root / "sync"
        ckpt = Checkpointer(target, ctx, keep_last=None)
        start = time.perf_counter()
        ckpt.save(1, model=model, optimizer=optimizer)
        seconds = time.perf_counter() - start
        shutil.rmtree(target)
        return seconds

    def dd() -> float:
        copy = root / "dd"
        copy.mkdir()
        start = time.perf_counter()
        for file in files:
            subprocess.run(["dd", f"if={file}", f"of={copy / file.name}", "bs=4M", "conv=fsync",
                            "status=none"], check=True)
        seconds = time.perf_counter() - start
        shutil.rmtree(copy)
        return seconds

    times = interleave(reps, {"ckpt": save, "dd": dd})
    ratio = median([d / c for d, c in zip(times["dd"], times["ckpt"])])  # same bytes: time ratio
    return {"bytes": written, "ckpt_s": times["ckpt"], "dd_s": times["dd"],
            "ckpt_mb_s": round(written / 2**20 / median(times["ckpt"]), 1),
            "dd_mb_s": round(written / 2**20 / median(times["dd"]), 1), "ratio": round(ratio, 3)}


def run_bench(reps: int = 5, *, steps: int = 12, directory: Path | None = None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=directory))
    note_before = load_note()
    segments = SEGMENT_REPS * reps
    try:
        stalled = stall(root, segments, steps)
        spent = save_cpu(root, reps)
        written = throughput(root, reps)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    note = f"{note_before} before, {load_note()} after"
    mb = stalled["bytes"] / 2**20
    stopped, lost = stalled["median_blocked_s"], stalled["median_slowdown_s"]
    print(table(f"Checkpoint cost: {mb:.0f} MB of state, one save in a {steps}-step segment "
                f"({stalled['median_segment_s']:.1f}s without a save), median of {segments} segments, "
                f"{reps} saves for CPU and MB/s "
                f"({note}; disk of {root.parent})",
                ["measure", "async save", "blocking torch.save / dd", "ratio", "goal"],
                [["training stopped (s)", stopped["async"], stopped["blocking"], stalled["ratio"],
                  goal_mark(stalled["ratio"], STALL_GOAL, at_most=True)],
                 ["training time lost (s)", lost["async"], lost["blocking"], stalled["lost_ratio"],
                  goal_mark(stalled["lost_ratio"], LOST_GOAL, at_most=True)],
                 ["CPU s per save, nothing else running (all threads)", spent["median_cpu_s"]["async"],
                  spent["median_cpu_s"]["blocking"], spent["ratio"], "report"],
                 ["write MB/s (sync Checkpointer.save vs dd conv=fsync)", written["ckpt_mb_s"],
                  written["dd_mb_s"], written["ratio"],
                  goal_mark(written["ratio"], THROUGHPUT_GOAL, at_most=False)]]), flush=True)
    return {"reps": reps, "load": note, "stall": stalled, "save_cpu": spent, "throughput": written}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5, 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="3 repetitions")
    parser.add_argument("--steps", type=int, default=12, help="training steps per timed segment")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: the temp dir)")
    args = parser.parse_args(argv)
    run_bench(args.reps or (3 if args.quick else 5), steps=args.steps, directory=args.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
