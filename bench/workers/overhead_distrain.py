"""Overhead benchmark, distrain side: the workloads with ddp.wrap, build_loader, TBLogger, StepTimer.

The loop is the one examples/digits_ddp.py runs (minus evaluation and the progress bar): every
step through the resumable loader and the step timer, every 10th step the standard scalars
(loss mean over ranks, lr, throughput, grad norm) into TensorBoard on rank 0. Rank 0 writes
``{"<workload>": steps_per_s, ...}`` to ``--out``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.nn import functional as F

from distrain import ddp
from distrain.data import build_loader
from distrain.logging import StepTimer, TBLogger, grad_norm, train_scalars

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The same models and data as the plain loop.
from workloads import Timing, Workload, build, timed, worker_args, write_rates


def training(work: Workload, ctx: ddp.Context, log_dir: Path) -> Iterator[int]:
    """The training loop of ``work``, one step per ``next()`` (yields the step number), for as
    many epochs as it is driven."""
    loader = build_loader(work.dataset, ctx, batch_size=work.batch_size, seed=0, num_workers=0)
    model = ddp.wrap(work.model, ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    timer = StepTimer(ctx)
    step, epoch = 0, 0
    with TBLogger(log_dir / work.name, ctx) as tb:
        while True:
            loader.set_epoch(epoch)
            for x, y in timer.wrap(loader):
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                timer.lap(len(y))
                if step % 10 == 0:
                    tb.scalars(train_scalars(ctx, loss=loss, lr=optimizer.param_groups[0]["lr"],
                                             epoch=epoch, stats=timer.window(),
                                             grad_norm=grad_norm(model)), step)
                yield step
            epoch += 1


def measure(name: str, ctx: ddp.Context, log_dir: Path, scale: float) -> Timing:
    """Steps/s of the timed steps, after the warm-up, and what they cost the process."""
    work = build(name, scale=scale)
    return timed(training(work, ctx, log_dir), work)


def main() -> None:
    args = worker_args()
    ctx = ddp.init()
    out = Path(args.out)
    rates = {name: measure(name, ctx, out.parent / f"tb-{out.stem}", args.scale)
             for name in args.workloads.split(",")}
    if ctx.is_main:
        write_rates(out, rates)
    ddp.cleanup()


if __name__ == "__main__":
    main()
