"""Ray start-up benchmark: the same function under ``distrain.launch.run(launcher="ray")`` and Ray Train.

    python bench/workers/ray_first_step.py distrain OUT
    python bench/workers/ray_first_step.py ray-train OUT

Both sides start the same local Ray the same way (``ray.init`` here: loopback, dashboard off,
2 CPUs per worker slot), then run :func:`first_step` on 2 workers: join the process group
(``distrain.ddp.init``, which takes the group Ray Train already made), the digits CNN under DDP
on the digits data through ``build_loader``, one optimizer step; each rank then writes the wall
clock to ``OUT/step-rank<R>``. The benchmark times the command up to the last stamp.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F


def first_step(out: str) -> int:
    from bench.workers.workloads import DigitsNet, digits_dataset
    from distrain import ddp
    from distrain.data import build_loader

    ctx = ddp.init()
    model = ddp.wrap(DigitsNet(), ctx)
    loader = build_loader(digits_dataset(), ctx, batch_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = next(iter(loader))
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    path = Path(out) / f"step-rank{ctx.rank}"
    path.write_text(repr(time.time()))
    return ctx.rank


def ray_train_loop(config: dict[str, Any]) -> None:
    first_step(config["out"])


def main() -> None:
    side, out = sys.argv[1], sys.argv[2]
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(num_cpus=max(os.cpu_count() or 1, 3), include_dashboard=False, log_to_driver=False)
    # By reference, from an importable module: the rank processes unpickle it (not from __main__).
    from bench.workers import ray_first_step as functions

    storage = tempfile.mkdtemp(prefix="ray-train-")
    try:
        if side == "distrain":
            from distrain.launch import run

            ranks = run(functions.first_step, out, nproc=2, launcher="ray")
            assert sorted(ranks.values()) == [0, 1], ranks
        else:
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchConfig, TorchTrainer

            TorchTrainer(functions.ray_train_loop, train_loop_config={"out": out},
                         scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                         torch_config=TorchConfig(backend="gloo"),
                         run_config=RunConfig(storage_path=storage)).fit()
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
