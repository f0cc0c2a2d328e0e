"""Train a small CNN on sklearn's handwritten digits with DDP: the main distrain example.

    distrain launch --nproc-per-node 2 examples/digits_ddp.py
    torchrun --nproc-per-node 2 examples/digits_ddp.py      # the same script, unchanged
    python examples/digits_ddp.py                           # a world of one

Real data, offline (1797 8x8 images). A checkpoint every epoch under RUN_DIR/ckpt; started again
(after a crash too, on any number of ranks) it resumes exactly. TensorBoard logs under RUN_DIR/tb.
Reaches about 0.97 test accuracy in 8 epochs. The logging tour is examples/digits_logging.py.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

import distrain
from distrain.data.datasets import digits


class DigitsNet(nn.Module):
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


@torch.no_grad()
def accuracy(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images.to(device)).argmax(1) == labels.to(device)).sum().item()
        total += len(labels)
    model.train()
    means = distrain.all_reduce_mean({"correct": float(correct), "total": float(total)})
    return means["correct"] / means["total"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--run-dir", default="runs/digits")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this global step")
    args = parser.parse_args()

    ctx = distrain.init()                                   # process group, device
    torch.manual_seed(0)
    model = distrain.wrap(DigitsNet())                      # DDP when there are several ranks
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    train = distrain.build_loader(digits(train=True), batch_size=args.batch_size)  # sharded, resumable
    test = distrain.build_loader(digits(train=False), batch_size=128, shuffle=False)
    ckpt = distrain.Checkpointer(f"{args.run_dir}/ckpt", keep_last=2)
    state = {"model": model, "optimizer": optimizer, "loader": train}
    step = ckpt.load_latest(**state) or 0                   # 0 on a fresh start
    tb = distrain.TBLogger(f"{args.run_dir}/tb", purge_step=step + 1 if step else None)

    for epoch in range(train.epoch, args.epochs):
        train.set_epoch(epoch)
        for images, labels in train:
            loss = F.cross_entropy(model(images.to(ctx.device)), labels.to(ctx.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 10 == 0:
                tb.scalar("train/loss", distrain.all_reduce_mean(loss).item(), step)
            if args.max_steps is not None and step >= args.max_steps:
                break
        test_accuracy = accuracy(model, test, ctx.device)
        tb.scalar("eval/accuracy", test_accuracy, step)
        ckpt.save(step, **state, extra={"epoch": epoch, "eval/accuracy": test_accuracy})
        distrain.print0(f"epoch {epoch}: step {step}, test accuracy {test_accuracy:.4f}")
        if args.max_steps is not None and step >= args.max_steps:
            break
    distrain.cleanup()                                      # pending writes, then a clean exit


if __name__ == "__main__":
    main()
