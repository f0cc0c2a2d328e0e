"""Reading TensorBoard event files back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import (
    HISTOGRAMS,
    SCALARS,
    TENSORS,
    EventAccumulator,
)


def read(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0, HISTOGRAMS: 0, TENSORS: 0})
    acc.Reload()
    return acc


def points(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]
