"""Memory of a checkpoint: sharded (every rank writes its shard) vs full (rank 0 writes it all).

    python bench/sharded_memory.py                   # 2 and 4 ranks, 640 MB of weights (~2 minutes)
    python bench/sharded_memory.py --mb 208 --ranks 2

One launch per world size (``distrain.launch.run``, gloo on CPU) of an FSDP model holding ``--mb``
MB of fp32 weights and SGD momentum as large (a checkpoint twice that size). Every rank then
saves it sharded and loads it back (``Checkpointer``, DCP: each rank writes and reads only its
shard), and saves and loads it through the full path (``sharded=False``: rank 0 gathers the whole
state and writes one file; each rank reads the whole file and keeps its shard).

Per operation and rank: resident memory (RSS) right before and its peak during the operation
(``VmHWM`` reset through ``/proc/self/clear_refs``, exact; a 2 ms sampler thread where that is not
possible), and seconds. The table shows the busiest rank's peak three ways: as is; above the
rank's *baseline* (RSS after imports and ``ddp.init``, before the model exists: training state
plus what the checkpoint needs; the goal is judged on this); above what it held right before
(what the checkpoint alone costs). Throughput is checkpoint bytes / seconds, hashing and
verification included (on load the files come from the page cache). About 0.55 GB of every
baseline is the CUDA build of torch's libraries, the same on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

MB = 1 << 20
OPS = ("save", "load")
PATHS = ("sharded", "full")


class PeakRSS:
    """Peak resident memory of this process over a ``with`` block."""

    def __init__(self) -> None:
        self.before = self.peak = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.before = psutil.Process().memory_info().rss
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self.peak = self.before
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)
            return
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                self.peak = int(line.split()[1]) * 1024


def _quiet_heap() -> None:
    """Return freed memory to the system first, so an earlier step does not inflate the next."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _model(mb: int) -> Any:
    from torch import nn

    width = 2048
    layers = max(1, -(-mb * MB // (4 * width * width)))  # at least mb MB of fp32 weights
    return nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))


def _rank(mb: int, root: str) -> dict[str, Any]:
    """On every rank: build the FSDP model, then save/load both ways, measuring each."""
    import torch

    from distrain import ddp
    from distrain.ckpt import Checkpointer

    ctx = ddp.init("gloo")  # Checkpointer's import brought DCP in: its pages are baseline too
    _quiet_heap()
    baseline = psutil.Process().memory_info().rss  # interpreter, libraries, process group
    torch.manual_seed(0)
    model = ddp.wrap(_model(mb), ctx, strategy="fsdp", min_block_params=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 2048)).sum().backward()
    optimizer.step()  # momentum buffers exist: the checkpoint holds them too
    optimizer.zero_grad(set_to_none=True)
    out: dict[str, Any] = {"rank": ctx.rank, "baseline": baseline}
    for path in PATHS:
        where = Path(root, path)
        for op in OPS:
            _quiet_heap()
            ddp.barrier()
            start = time.perf_counter()
            with PeakRSS() as rss:
                if op == "save":
                    ckpt = Checkpointer(where, ctx, sharded=path == "sharded")
                    ckpt.save(1, model=model, optimizer=optimizer)
                else:
                    Checkpointer(where, ctx).load_latest(model=model, optimizer=optimizer)
            out[f"{path}-{op}"] = {"before": rss.before, "peak": rss.peak, "baseline": baseline,
                                   "seconds": time.perf_counter() - start}
        out[f"{path}-bytes"] = sum(f.stat().st_size for f in where.rglob("*") if f.is_file())
    ddp.cleanup()
    return out


def measure(world_size: int, mb: int) -> dict[str, Any]:
    """One launch on ``world_size`` ranks; the busiest rank's numbers per path and operation."""
    from distrain.launch import run as launch_fn

    root = tempfile.mkdtemp(prefix="distrain-shardmem-")
    try:
        ranks = launch_fn(_rank, mb, root, nproc=world_size)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    row: dict[str, Any] = {"world_size": world_size}
    for path in PATHS:
        size = max(r[f"{path}-bytes"] for r in ranks.values())
        for op in OPS:
            cells = [r[f"{path}-{op}"] for r in ranks.values()]
            busiest = max(cells, key=lambda cell: cell["peak"])
            seconds = max(cell["seconds"] for cell in cells)
            row[f"{path}_{op}"] = {
                "peak_mb": busiest["peak"] / MB,
                "training_mb": (busiest["peak"] - busiest["baseline"]) / MB,
                "extra_mb": (busiest["peak"] - busiest["before"]) / MB,
                "seconds": seconds, "mb_per_s": size / MB / seconds, "checkpoint_mb": size / MB}
    for op in OPS:
        sharded, full = row[f"sharded_{op}"], row[f"full_{op}"]
        row[f"{op}_peak_ratio"] = sharded["peak_mb"] / full["peak_mb"]
        row[f"{op}_training_ratio"] = sharded["training_mb"] / full["training_mb"]
        row[f"{op}_extra_ratio"] = sharded["extra_mb"] / max(full["extra_mb"], 1e-9)
        row[f"{op}_speedup"] = full["seconds"] / sharded["seconds"]
    return row


def table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per world size, operation and path; the ratio columns on the full path's line."""
    lines = [f"{'ranks':>5}  {'op':<4}  {'path':<7}  {'peak RSS':>9}  {'- baseline':>10}  {'- before':>9}  "
             f"{'seconds':>7}  {'MB/s':>6}   sharded/full: (peak - baseline), peak, time"]
    for row in rows:
        for op in OPS:
            for path in PATHS:
                cell = row[f"{path}_{op}"]
                ratios = ""
                if path == "full":
                    ratios = (f"{row[f'{op}_training_ratio']:.2f}, {row[f'{op}_peak_ratio']:.2f}, "
                              f"{1 / row[f'{op}_speedup']:.2f}")
                lines.append(
                    f"{row['world_size']:>5}  {op:<4}  {path:<7}  {cell['peak_mb']:>6.0f} MB  "
                    f"{cell['training_mb']:>7.0f} MB  {cell['extra_mb']:>6.0f} MB  {cell['seconds']:>7.2f}  "
                    f"{cell['mb_per_s']:>6.0f}   " + ratios)
    return "\n".join(lines)


def run(mb: int = 640, ranks: Sequence[int] = (2, 4)) -> dict[str, Any]:
    """Measure, print the table, return the numbers (``bench/run_all.py`` imports this)."""
    started = time.perf_counter()
    rows = [measure(w, mb) for w in ranks]
    one, five, _ = os.getloadavg()
    size = rows[0]["full_save"]["checkpoint_mb"]
    print(f"sharded vs full checkpoint, FSDP model of {size / 2:.0f} MB + momentum ({size:.0f} MB on disk), "
          f"busiest rank; load average {one:.1f}/{five:.1f} on {os.cpu_count()} cores")
    print(table(rows))
    at_two = next((r for r in rows if r["world_size"] == 2), rows[0])
    goal = at_two["save_training_ratio"] <= 0.6 and at_two["load_training_ratio"] <= 0.6
    falling = all(b[f"{op}_training_ratio"] <= a[f"{op}_training_ratio"]
                  for a, b in itertools.pairwise(rows) for op in OPS)
    print(f"goal (sharded peak - baseline <= 0.6 x full's at 2 ranks, falling with ranks): "
          f"{'met' if goal and falling else 'NOT met'}; {time.perf_counter() - started:.0f} s")
    return {"name": "sharded_memory", "model_mb": mb, "rows": rows, "goal_met": goal and falling}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=640, help="MB of fp32 weights (rounded up to whole layers)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    if args.mb < 1 or any(w < 1 for w in args.ranks):
        parser.error("--mb and --ranks must be positive")
    run(args.mb, args.ranks)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
