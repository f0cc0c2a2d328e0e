"""Datasets that work offline: sklearn's digits (real data), CIFAR-10 from disk or FakeData."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from distrain.errors import ConfigError

# Imported lazily below (optional dependencies); the fast-start server imports them up front
# when a script imports this module (distrain/launchers/preload_guard.py).
DISTRAIN_PRELOAD = ("sklearn.datasets", "torchvision")


def digits(*, train: bool = True, test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """sklearn's 8x8 handwritten digits (1797 images, 10 classes) as ``(1x8x8 float, label)``.

    The split is fixed by ``seed``; pixel values are scaled to [0, 1].
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    cut = int(len(labels) * (1 - test_fraction))
    chosen = order[:cut] if train else order[cut:]
    return TensorDataset(images[chosen], labels[chosen])


def cifar10(data_dir: str | None, *, train: bool = True, transform: Any = None,
            fake_size: int = 512) -> Dataset[Any]:
    """CIFAR-10 from ``data_dir`` (the extracted ``cifar-10-batches-py``), never downloaded.

    With no ``data_dir``, torchvision's FakeData of the same shape (3x32x32, 10 classes).
    """
    import torchvision
    from torchvision import transforms

    transform = transform or transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    if data_dir is None:
        return torchvision.datasets.FakeData(
            size=fake_size, image_size=(3, 32, 32), num_classes=10, transform=transform,
            random_offset=0 if train else 10_000,
        )
    root = Path(data_dir)
    if not (root / "cifar-10-batches-py").is_dir():
        raise ConfigError(
            "--data-dir", data_dir, "a directory holding cifar-10-batches-py/",
            "extract cifar-10-python.tar.gz there, or omit --data-dir to use FakeData",
        )
    return torchvision.datasets.CIFAR10(str(root), train=train, transform=transform, download=False)
