"""The logging tour: examples/digits_ddp.py with everything distrain.logging offers.

    distrain launch --nproc-per-node 2 examples/digits_logging.py --epochs 8

The same training as the main example, plus a config table, a per-epoch progress bar, step
timing (samples/s, data-wait share), averaged training scalars with the gradient norm and lr,
evaluation scalars, hparams and a closing summary. See docs/logging.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from digits_ddp import DigitsNet  # the main example's model; the script's folder is on sys.path
from torch import nn
from torch.nn import functional as F

from distrain import ddp
from distrain.ckpt import Checkpointer
from distrain.data import build_loader
from distrain.data.datasets import digits
from distrain.logging import (
    EpochProgress,
    StepTimer,
    TBLogger,
    eval_scalars,
    grad_norm,
    print_config,
    print_summary,
    train_scalars,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default="runs/digits-logging")
    parser.add_argument("--ckpt", default=None,
                        help="checkpoints: a directory or a store URL (s3://bucket/run); "
                             "default RUN_DIR/ckpt")
    parser.add_argument("--log-every", type=int, default=10, help="steps between TensorBoard points")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this global step")
    return parser.parse_args()


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, ctx: ddp.Context) -> dict[str, float]:
    model.eval()
    correct = count = loss_sum = 0.0
    for images, labels in loader:
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    model.train()
    return eval_scalars(ctx, correct=correct, count=count, loss_sum=loss_sum)


def main() -> None:
    args = parse_args()
    ctx = ddp.init()
    torch.manual_seed(args.seed)
    run_dir = Path(args.run_dir)
    print_config(vars(args) | {"world_size": ctx.world_size, "device": str(ctx.device)}, ctx)

    train_loader = build_loader(digits(train=True), ctx, batch_size=args.batch_size, seed=args.seed)
    test_loader = build_loader(digits(train=False), ctx, batch_size=128, shuffle=False)
    model = ddp.wrap(DigitsNet(), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train_loader))

    ckpt = Checkpointer(args.ckpt or run_dir / "ckpt", ctx, keep_last=2)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": train_loader}
    step = ckpt.load_latest(**state) or 0
    if step:
        ddp.print0(f"resumed from step {step} (epoch {train_loader.epoch}, "
                   f"{train_loader.sampler.consumed} samples into it)")
    # A resumed run drops the points an interrupted attempt logged after its checkpoint.
    tb = TBLogger(run_dir / "tb", ctx, purge_step=step + 1 if step else None)
    tb.text("config", str(vars(args)), step)

    timer, start, metrics = StepTimer(ctx), time.perf_counter(), {}
    for epoch in range(train_loader.epoch, args.epochs):
        train_loader.set_epoch(epoch)
        with EpochProgress(ctx, total=len(train_loader), epoch=epoch) as progress:
            for images, labels in timer.wrap(train_loader):
                images, labels = images.to(ctx.device), labels.to(ctx.device)
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                norm = grad_norm(model)
                optimizer.step()
                scheduler.step()
                step += 1
                stats = timer.lap(len(labels))
                progress.update(loss=loss, samples_per_s=stats.samples_per_s)
                if step % args.log_every == 0:
                    tb.scalars(train_scalars(ctx, loss=loss, lr=scheduler.get_last_lr()[0], epoch=epoch,
                                             stats=timer.window(), grad_norm=norm), step)
                if args.max_steps is not None and step >= args.max_steps:
                    break
        metrics = evaluate(model, test_loader, ctx)
        tb.scalars(metrics, step)
        ckpt.save(step, **state, extra={"epoch": epoch, **metrics})
        ddp.print0(f"epoch {epoch}: step {step}, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if args.max_steps is not None and step >= args.max_steps:
            break

    tb.hparams({"lr": args.lr, "batch_size": args.batch_size, "world_size": ctx.world_size}, metrics)
    print_summary(ctx, steps=step, seconds=time.perf_counter() - start, metrics=metrics,
                  ckpt_dir=ckpt.root, log_dir=run_dir / "tb")
    tb.close()
    ddp.cleanup()


if __name__ == "__main__":
    main()
