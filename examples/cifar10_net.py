"""The classic CIFAR-10 tutorial network and loop, made distributed with distrain.

    distrain launch --nproc-per-node 2 examples/cifar10_net.py --data-dir ~/data     # real CIFAR-10
    distrain launch --nproc-per-node 2 examples/cifar10_net.py                       # FakeData
    distrain launch --nproc-per-node 2 --preload torchvision examples/cifar10_net.py # faster start

The network (two conv + three linear layers), SGD with lr=0.001 and momentum=0.9 and the
zero_grad / forward / loss / backward / step loop are the PyTorch tutorial's, line for line. What
distrain adds is three calls: ``ddp.init()``, ``ddp.wrap(net, ctx)`` and ``build_loader(...)``
(a sharded, resumable loader), then ``ddp.cleanup()``. As in the tutorials, a ``StepLR`` schedule
is stepped once per epoch; with ``--run-dir`` a checkpoint is written after every epoch (model,
optimizer, scheduler, loader) and a second launch resumes exactly where it stopped, learning rate
included. ``--data-dir`` is the directory holding
the extracted ``cifar-10-batches-py`` (never downloaded); without it, torchvision's FakeData of
the same shape stands in, so the loop runs offline (its accuracy is chance, by construction).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import StepLR

from distrain import ddp
from distrain.ckpt import Checkpointer
from distrain.data import build_loader
from distrain.data.datasets import cifar10


class Net(nn.Module):
    """The tutorial's network, unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="holds cifar-10-batches-py/; FakeData if absent")
    parser.add_argument("--epochs", type=int, default=2, help="the tutorial's 2")
    parser.add_argument("--batch-size", type=int, default=4, help="per rank (the tutorial's 4)")
    parser.add_argument("--fake-size", type=int, default=2000, help="FakeData images (no --data-dir)")
    parser.add_argument("--print-every", type=int, default=2000, help="mini-batches between loss lines")
    parser.add_argument("--lr-step", type=int, default=1, help="StepLR: epochs between lr decays")
    parser.add_argument("--run-dir", default=None, help="checkpoint every epoch here, resume from it")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    ctx = ddp.init()
    torch.manual_seed(0)
    trainset = cifar10(args.data_dir, train=True, fake_size=args.fake_size)
    testset = cifar10(args.data_dir, train=False, fake_size=max(args.fake_size // 5, 1))
    trainloader = build_loader(trainset, ctx, batch_size=args.batch_size, shuffle=True)
    testloader = build_loader(testset, ctx, batch_size=100, shuffle=False)

    net = ddp.wrap(Net(), ctx)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    scheduler = StepLR(optimizer, step_size=args.lr_step, gamma=0.5)
    ckpt = Checkpointer(f"{args.run_dir}/ckpt", ctx) if args.run_dir else None
    # The checkpoint's step is the number of epochs done (one is saved after every epoch).
    start = (ckpt.load_latest(model=net, optimizer=optimizer, scheduler=scheduler, loader=trainloader)
             if ckpt is not None else None) or 0
    if start:
        ddp.print0(f"resumed after epoch {start}, lr {scheduler.get_last_lr()[0]:.6g}")

    for epoch in range(start, args.epochs):
        trainloader.set_epoch(epoch)  # each epoch a new shuffle, split across the ranks
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(trainloader):
            inputs, labels = inputs.to(ctx.device), labels.to(ctx.device)
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()

            running_loss += loss.item()
            if i % args.print_every == args.print_every - 1:
                mean = ddp.all_reduce_mean(running_loss / args.print_every)  # over all ranks
                ddp.print0(f"[{epoch + 1}, {i + 1:5d}] loss: {mean:.3f}")
                running_loss = 0.0
        epoch_lr = scheduler.get_last_lr()[0]
        scheduler.step()  # per epoch, as the tutorials do
        if ckpt is not None:
            ckpt.save(epoch + 1, model=net, optimizer=optimizer, scheduler=scheduler, loader=trainloader)
        ddp.print0(f"epoch {epoch + 1} lr {epoch_lr:.6g} last loss {ddp.all_reduce_mean(loss.item()):.6f}")

    correct = total = 0
    net.eval()
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(ctx.device))
            correct += (outputs.argmax(1) == labels.to(ctx.device)).sum().item()
            total += labels.size(0)
    # Every rank saw its shard of the test set: the mean over ranks is the whole set's accuracy.
    accuracy = ddp.all_reduce_mean(correct / max(total, 1))
    ddp.print0(f"Finished Training. Accuracy of the network on the test images: {100 * accuracy:.1f} %")
    ddp.cleanup()


if __name__ == "__main__":
    main()
