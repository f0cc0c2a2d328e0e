"""The files of an in-memory snapshot: one preallocated data file and one meta file per slot.

A slot is ``slot-<i>.bin`` (every tensor of the state, back to back, 64-byte aligned, written
through a shared memory mapping) and ``slot-<i>.meta`` (JSON: the state's structure as
:mod:`distrain.ckpt.skeleton` encodes it, each tensor's dtype, shape and offset, the step and an
xxh3-64 digest of the data). The meta file is removed before the data is overwritten and put
back with an atomic rename after it is complete, so a slot that has a meta file holds a complete
state, whatever instant the writer was killed at; the digest catches anything else. JSON, not
``torch.save``: writing it after every step must cost microseconds, and reading it runs no pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from distrain.ckpt.skeleton import dtype_name, dtype_named

ALIGN = 64
FORMAT = 1

Spec = tuple[torch.dtype, tuple[int, ...]]  # a tensor's dtype and shape


def specs_of(tensors: list[torch.Tensor]) -> tuple[Spec, ...]:
    """What the slot layout depends on: every tensor's dtype and shape, in order."""
    return tuple((t.dtype, tuple(t.shape)) for t in tensors)


def layout(specs: tuple[Spec, ...]) -> tuple[list[int], int]:
    """Offsets of the tensors in a slot's data file and the file's size."""
    offsets, end = [], 0
    for dtype, shape in specs:
        offsets.append(end)
        numel = 1
        for n in shape:
            numel *= n
        end += -(-numel * dtype.itemsize // ALIGN) * ALIGN
    return offsets, max(end, ALIGN)


def digest(data: torch.Tensor) -> int:
    """xxh3-64 of a byte tensor (several times faster than CRC-32; releases the GIL)."""
    return int(xxhash.xxh3_64_intdigest(memoryview(data.numpy().data)))


@dataclass(slots=True, kw_only=True)
class SlotMeta:
    step: int
    world_size: int
    rank: int
    size: int
    digest: int
    specs: tuple[Spec, ...]
    offsets: list[int]
    skeleton: Any  # skeleton.encode's output

    def to_bytes(self, table: str | None = None) -> bytes:
        """The meta file's bytes; ``table``: :meth:`table` of these specs and offsets, if kept."""
        head = json.dumps({"format": FORMAT, "step": self.step, "world_size": self.world_size,
                           "rank": self.rank, "size": self.size, "digest": self.digest})
        skeleton = json.dumps(self.skeleton, separators=(",", ":"))
        return f'{head[:-1]}, "tensors": {table or self.table()}, "skeleton": {skeleton}}}'.encode()

    def table(self) -> str:
        """The tensors' dtypes, shapes and offsets as JSON (the same after every step)."""
        return json.dumps([[dtype_name(dtype), list(shape), offset]
                           for (dtype, shape), offset in zip(self.specs, self.offsets)],
                          separators=(",", ":"))

    @classmethod
    def from_bytes(cls, raw: bytes) -> SlotMeta:
        found = json.loads(raw)
        if found.get("format") != FORMAT:
            raise ValueError(f"snapshot meta format {found.get('format')!r}")
        specs = tuple((dtype_named(d), tuple(int(n) for n in shape)) for d, shape, _ in found["tensors"])
        return cls(step=int(found["step"]), world_size=int(found["world_size"]), rank=int(found["rank"]),
                   size=int(found["size"]), digest=int(found["digest"]), specs=specs,
                   offsets=[int(o) for _, _, o in found["tensors"]], skeleton=found["skeleton"])


def tensor_views(meta: SlotMeta, data: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of the state described by ``meta`` as views into the bytes ``data``."""
    views = []
    for offset, (dtype, shape) in zip(meta.offsets, meta.specs):
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        views.append(data[offset:offset + nbytes].view(dtype).view(shape))
    return views


def pick(slots: list[Slot]) -> Slot:
    """The slot of a ring to overwrite: an empty one, else the one holding the oldest step."""
    steps = [meta.step if meta is not None else None for meta in (s.read_meta() for s in slots)]
    return slots[min(range(len(slots)), key=lambda i: (steps[i] is not None, steps[i] or 0))]


class Slot:
    """One slot of a rank's snapshot ring: a data file mapped into memory and its meta file."""

    def __init__(self, directory: Path, index: int) -> None:
        self.data_path = directory / f"slot-{index}.bin"
        self.meta_path = directory / f"slot-{index}.meta"
        self._meta = str(self.meta_path)  # str paths: this runs after every step
        self._temp = str(directory / f".slot-{index}.meta.tmp")
        self._data: torch.Tensor | None = None
        self._views: tuple[Any, list[torch.Tensor]] | None = None

    def allocate(self, size: int) -> torch.Tensor:
        """The data file, ``size`` bytes reserved up front (tmpfs would SIGBUS on a write past
        its room; ``posix_fallocate`` says ENOSPC now instead), mapped shared."""
        if self._data is not None and self._data.numel() == size:
            return self._data
        self._data = None
        self._views = None
        self.invalidate()
        # A new file, not the old one resized: a thread still sending the old data (a buddy
        # copy) keeps its mapping of the old file, which shrinking in place would SIGBUS.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.data_path)
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        self._data = torch.from_file(str(self.data_path), shared=True, size=size, dtype=torch.uint8)
        return self._data

    def views(self, meta: SlotMeta, data: torch.Tensor) -> list[torch.Tensor]:
        """The tensors of the state as views into ``data`` (kept while the layout is the same:
        three view operations per tensor after every step would cost more than a small copy)."""
        key = (meta.specs, data.data_ptr(), data.numel())
        if self._views is not None and self._views[0] == key:
            return self._views[1]
        views = tensor_views(meta, data)
        if data is self._data:
            self._views = (key, views)
        return views

    def invalidate(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._meta)

    def commit(self, meta: SlotMeta, table: str | None = None) -> None:
        self.commit_raw(meta.to_bytes(table))

    def commit_raw(self, raw: bytes) -> None:
        """Publish the meta file ``raw`` (the data is complete): an atomic rename."""
        fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, raw)
        finally:
            os.close(fd)
        os.replace(self._temp, self._meta)

    def read_meta(self) -> SlotMeta | None:
        """The meta of a complete slot, or None (never written, being written, or damaged)."""
        try:
            meta = SlotMeta.from_bytes(self.meta_path.read_bytes())
            if self.data_path.stat().st_size != meta.size:
                return None
            return meta
        except (OSError, TypeError, KeyError, ValueError, IndexError, AttributeError):
            return None

    def mapped(self, size: int) -> torch.Tensor:
        """The data file, mapped (as it is: not checked)."""
        return torch.from_file(str(self.data_path), shared=True, size=size, dtype=torch.uint8)

    def _mapped(self, meta: SlotMeta) -> torch.Tensor | None:
        """The data, mapped, if it matches its digest."""
        data = self.mapped(meta.size)
        return data if digest(data) == meta.digest else None

    def verify(self, meta: SlotMeta) -> bool:
        return self._mapped(meta) is not None

    def read(self, meta: SlotMeta) -> list[torch.Tensor] | None:
        """Private copies of the slot's tensors, or None if the data does not match its digest."""
        data = self._mapped(meta)
        return None if data is None else [view.clone() for view in self.views(meta, data)]
