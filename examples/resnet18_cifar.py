"""torchvision's ResNet-18 on CIFAR-10 with augmentations, mixed precision and resumable checkpoints.

    distrain launch --nproc-per-node 2 --preload torchvision examples/resnet18_cifar.py --data-dir ~/data
    distrain launch --nproc-per-node 2 --preload torchvision examples/resnet18_cifar.py   # FakeData
    torchrun --nproc-per-node 8 examples/resnet18_cifar.py --data-dir ~/data --epochs 30   # GPUs

The usual CIFAR recipe: ResNet-18 with a 3x3 stem and no max-pool (32x32 inputs), random crop
with 4 pixels of padding and horizontal flips, SGD with Nesterov momentum, weight decay and a
one-cycle schedule (warm-up, then cosine decay). ``--amp auto`` turns on fp16 autocast with
loss scaling on GPUs and leaves CPU runs in fp32 (``--amp on`` uses bf16 on CPU too). A
checkpoint is written every epoch and the run resumes from the newest one when started again.
Without ``--data-dir`` (the directory holding ``cifar-10-batches-py``) torchvision's FakeData
stands in so the loop runs offline, in about a minute on 2 CPU cores with the default settings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision import transforms

from distrain import ddp
from distrain.ckpt import Checkpointer
from distrain.data import build_loader
from distrain.data.datasets import cifar10

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def resnet18_cifar() -> nn.Module:
    """ResNet-18 for 32x32 images: a 3x3 stride-1 stem and no max-pool keep the resolution."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()  # type: ignore[assignment]
    return model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="holds cifar-10-batches-py/; FakeData if absent")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.02,
                        help="peak learning rate; about 0.1 suits a global batch of 256+ on real data")
    parser.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                        help="auto: fp16 autocast on GPUs, fp32 on CPU")
    parser.add_argument("--fake-size", type=int, default=256, help="FakeData images (no --data-dir)")
    parser.add_argument("--run-dir", default="runs/resnet18")
    return parser.parse_args()


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, ctx: ddp.Context,
             amp: bool) -> float:
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    for images, labels in loader:
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        with ddp.autocast(ctx, enabled=amp):
            predicted = model(images).argmax(1)
        correct += torch.tensor([(predicted == labels).sum().item(), len(labels)], dtype=torch.float64)
    model.train()
    totals = ddp.all_reduce_mean(correct)  # the ratio of means is the ratio of sums
    return float(totals[0] / totals[1])


def main() -> None:
    args = parse_args()
    ctx = ddp.init()
    torch.manual_seed(0)
    amp = args.amp == "on" or (args.amp == "auto" and ctx.device.type == "cuda")
    augment = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train_set = cifar10(args.data_dir, train=True, transform=augment, fake_size=args.fake_size)
    test_set = cifar10(args.data_dir, train=False, transform=plain, fake_size=max(args.fake_size // 4, 1))
    train_loader = build_loader(train_set, ctx, batch_size=args.batch_size, drop_last=True)
    test_loader = build_loader(test_set, ctx, batch_size=2 * args.batch_size, shuffle=False)

    model = ddp.wrap(resnet18_cifar(), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    # One cycle: a warm-up from lr/25 to lr, then a cosine decay (no early blow-up).
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=max(1, args.epochs * len(train_loader)))
    scaler = ddp.grad_scaler(ctx, enabled=amp)  # loss scaling for fp16 on GPUs; a no-op otherwise

    ckpt = Checkpointer(Path(args.run_dir) / "ckpt", ctx, keep_last=2)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
             "loader": train_loader}
    step = ckpt.load_latest(**state) or 0
    if step:
        ddp.print0(f"resumed from step {step} (epoch {train_loader.epoch})")

    for epoch in range(train_loader.epoch, args.epochs):
        train_loader.set_epoch(epoch)
        start, loss_sum, batches = time.perf_counter(), 0.0, 0
        for images, labels in train_loader:
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            with ddp.autocast(ctx, enabled=amp):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            loss_sum, batches = loss_sum + loss.item(), batches + 1
        accuracy = evaluate(model, test_loader, ctx, amp)
        ckpt.save(step, **state, extra={"epoch": epoch, "accuracy": accuracy})
        mean_loss = ddp.all_reduce_mean(loss_sum / max(batches, 1))
        ddp.print0(f"epoch {epoch}: step {step}, train loss {mean_loss:.4f}, test accuracy "
                   f"{accuracy:.4f}, {time.perf_counter() - start:.1f}s, amp {'on' if amp else 'off'}")
    ddp.cleanup()


if __name__ == "__main__":
    main()
