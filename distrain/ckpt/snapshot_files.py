"""The files of an in-memory snapshot: one preallocated data file and one meta file per slot.

A slot is ``slot-<i>.bin`` (every tensor of the state, back to back, 64-byte aligned, written
through a shared memory mapping) and ``slot-<i>.meta`` (``torch.save`` of the state's structure
with every tensor replaced by a ``meta`` tensor of its shape and dtype, the offsets, the step and
a CRC-32 of the data). The meta file is removed before the data is overwritten and put back with
an atomic rename after it is complete, so a slot that has a meta file holds a complete state,
whatever instant the writer was killed at; the CRC catches anything else.
"""

from __future__ import annotations

import contextlib
import io
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ALIGN = 64
_CRC_CHUNK = 64 << 20


def flatten(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by a meta tensor of its shape; the tensors in order."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if type(value) in (dict, OrderedDict):
        out = {k: flatten(v, tensors) for k, v in value.items()}
        return OrderedDict(out) if type(value) is OrderedDict else out
    if type(value) in (list, tuple):
        return type(value)(flatten(v, tensors) for v in value)
    return value


def unflatten(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of :func:`flatten`: meta tensors replaced by ``tensors`` in the same order."""
    position = iter(tensors)

    def fill(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return next(position)
        if type(value) in (dict, OrderedDict):
            out = {k: fill(v) for k, v in value.items()}
            return OrderedDict(out) if type(value) is OrderedDict else out
        if type(value) in (list, tuple):
            return type(value)(fill(v) for v in value)
        return value

    return fill(skeleton)


def layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Offsets of the tensors in a slot's data file and the file's size."""
    offsets, end = [], 0
    for tensor in tensors:
        offsets.append(end)
        end += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    return offsets, max(end, ALIGN)


def crc(data: torch.Tensor) -> int:
    """CRC-32 of a byte tensor (zlib releases the GIL on large buffers)."""
    value = 0
    view = memoryview(data.numpy().data)
    for start in range(0, len(view), _CRC_CHUNK):
        value = zlib.crc32(view[start:start + _CRC_CHUNK], value)
    return value


@dataclass(slots=True, kw_only=True)
class SlotMeta:
    step: int
    world_size: int
    rank: int
    size: int
    crc: int
    offsets: list[int]
    skeleton: Any

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"step": self.step, "world_size": self.world_size, "rank": self.rank,
                    "size": self.size, "crc": self.crc, "offsets": self.offsets,
                    "skeleton": self.skeleton}, buffer)
        return buffer.getvalue()


class Slot:
    """One slot of a rank's snapshot ring: a data file mapped into memory and its meta file."""

    def __init__(self, directory: Path, index: int) -> None:
        self.data_path = directory / f"slot-{index}.bin"
        self.meta_path = directory / f"slot-{index}.meta"
        self._data: torch.Tensor | None = None

    def allocate(self, size: int) -> torch.Tensor:
        """The data file, ``size`` bytes reserved up front (tmpfs would SIGBUS on a write past
        its room; ``posix_fallocate`` says ENOSPC now instead), mapped shared."""
        if self._data is not None and self._data.numel() == size:
            return self._data
        self._data = None
        self.invalidate()
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        self._data = torch.from_file(str(self.data_path), shared=True, size=size, dtype=torch.uint8)
        return self._data

    def views(self, meta: SlotMeta, data: torch.Tensor) -> list[torch.Tensor]:
        """The tensors of the state as views into ``data``."""
        found: list[torch.Tensor] = []
        flatten(meta.skeleton, found)
        views = []
        for offset, shape in zip(meta.offsets, found):
            nbytes = shape.numel() * shape.element_size()
            views.append(data[offset:offset + nbytes].view(shape.dtype).view(shape.shape))
        return views

    def invalidate(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.meta_path.unlink()

    def commit(self, meta: SlotMeta) -> None:
        temp = self.meta_path.with_name(f".{self.meta_path.name}.tmp")
        temp.write_bytes(meta.to_bytes())
        os.replace(temp, self.meta_path)

    def read_meta(self) -> SlotMeta | None:
        """The meta of a complete slot, or None (never written, being written, or damaged)."""
        try:
            raw = torch.load(self.meta_path, map_location="meta", weights_only=True)
            meta = SlotMeta(**raw)
            if self.data_path.stat().st_size != meta.size:
                return None
            return meta
        except (OSError, RuntimeError, EOFError, TypeError, KeyError, ValueError):
            return None

    def _mapped(self, meta: SlotMeta) -> torch.Tensor | None:
        """The data, mapped, if it matches its CRC."""
        data = torch.from_file(str(self.data_path), shared=True, size=meta.size, dtype=torch.uint8)
        return data if crc(data) == meta.crc else None

    def verify(self, meta: SlotMeta) -> bool:
        return self._mapped(meta) is not None

    def read(self, meta: SlotMeta) -> list[torch.Tensor] | None:
        """Private copies of the slot's tensors, or None if the data does not match its CRC."""
        data = self._mapped(meta)
        return None if data is None else [view.clone() for view in self.views(meta, data)]
