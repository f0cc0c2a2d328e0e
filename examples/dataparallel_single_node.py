"""One process, all the GPUs it sees: DataParallel, or a plain module on CPU. No launcher needed.

    python examples/dataparallel_single_node.py                 # DataParallel over every visible GPU
    CUDA_VISIBLE_DEVICES=0,1 python examples/dataparallel_single_node.py
    python examples/dataparallel_single_node.py --strategy auto # what ddp.wrap picks by itself

``ddp.wrap(model, ctx, strategy="dp")`` is the single-process, multi-GPU path: one Python process
splits each batch across the visible GPUs (simple, no launcher, but slower than DDP, which runs
one process per GPU: prefer ``distrain launch --nproc-per-node gpu`` when you can). With no GPU it
falls back to the plain module on CPU and says so. The script trains digits' small CNN from
``digits_ddp.py``, with the global batch given here and split by DataParallel, and prints the
test accuracy (about 0.94 in 4 epochs).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from distrain import ddp
from distrain.data import build_loader
from distrain.data.datasets import digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_ddp import DigitsNet  # the sibling example's model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="the whole batch, split across GPUs")
    parser.add_argument("--strategy", choices=("dp", "auto"), default="dp")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows wrap's decision

    ctx = ddp.init()  # no launcher: a world of one, no process group
    torch.manual_seed(0)
    gpus = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    model = ddp.wrap(DigitsNet(), ctx, strategy=args.strategy)
    wrapper = type(model).__name__
    fallback = "" if isinstance(model, torch.nn.DataParallel) else " (plain module: no GPU to split over)"
    print(f"{gpus} GPU(s) visible -> {wrapper}{fallback}")

    train_loader = build_loader(digits(train=True), ctx, batch_size=args.batch_size)
    test_loader = build_loader(digits(train=False), ctx, batch_size=256, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        train_loader.set_epoch(epoch)
        for images, labels in train_loader:
            loss = F.cross_entropy(model(images.to(ctx.device)), labels.to(ctx.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: loss {loss.item():.4f}")

    model.eval()
    correct = count = 0
    with torch.no_grad():
        for images, labels in test_loader:
            correct += (model(images.to(ctx.device)).argmax(1).cpu() == labels).sum().item()
            count += len(labels)
    print(f"test accuracy {correct / count:.4f} with {wrapper} in {time.perf_counter() - start:.1f}s")
    ddp.cleanup()


if __name__ == "__main__":
    main()
