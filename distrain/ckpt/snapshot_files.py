"""The files of an in-memory snapshot: one preallocated data file and one meta file per slot.

A slot is ``slot-<i>.bin`` (every tensor of the state, back to back, 64-byte aligned) and
``slot-<i>.meta`` (a 32-byte header, then JSON: the state's structure as
:mod:`distrain.ckpt.skeleton` encodes it, each tensor's dtype, shape and offset, the step and an
xxh3-64 digest of the data). Both files are preallocated and written through shared memory
mappings, so taking a snapshot of a small state makes no system call at all.

The header's commit word is what makes a slot complete: it is zeroed before the data is
overwritten and, once data and JSON are in place, set by one 8-byte store to a digest of the
JSON (never 0). A slot whose commit word matches its JSON holds a complete state, whatever
instant the writer was killed at (a store cut short cannot match: the word was 0, and a prefix
of the digest equals the digest only once the rest is already in place); the data's own digest
catches anything else. JSON, not ``torch.save``: it is written after every step, and reading it
runs no pickle.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from distrain.ckpt.skeleton import dtype_name, dtype_named

ALIGN = 64
FORMAT = 2
MAGIC = b"dsnapm02"
#: The meta file's header: magic, commit word (0: not complete), JSON length, unused.
HEADER = struct.Struct("<8sQQQ")
_COMMIT_AT = 8
_PAGE = 4096

Spec = tuple[torch.dtype, tuple[int, ...]]  # a tensor's dtype and shape


def specs_of(tensors: list[torch.Tensor]) -> tuple[Spec, ...]:
    """What the slot layout depends on: every tensor's dtype and shape, in order."""
    return tuple([(t.dtype, t.shape) for t in tensors])  # torch.Size: a tuple already


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
    skeleton: Any  # skeleton.encode's output (None where the taker gives skeleton_json instead)
    skeleton_json: str | None = None  # its JSON text, as the taker rendered it

    def to_bytes(self, table: str | None = None) -> bytes:
        """The meta file's bytes; ``table``: :meth:`table` of these specs and offsets, if kept."""
        skeleton = self.skeleton_json or json.dumps(self.skeleton)
        head = (f'{{"format":{FORMAT},"step":{int(self.step)},"world_size":{int(self.world_size)},'
                f'"rank":{int(self.rank)},"size":{int(self.size)},"digest":{int(self.digest)}')
        return f'{head},"tensors":{table or self.table()},"skeleton":{skeleton}}}'.encode()

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


def verified_copies(meta: SlotMeta, data: torch.Tensor) -> list[torch.Tensor] | None:
    """Private copies of the tensors in the slot bytes ``data`` (a view into them is no
    parameter), or None if the bytes do not match the digest in ``meta``."""
    if digest(data) != meta.digest:
        return None
    return [view.clone() for view in tensor_views(meta, data)]


def pick(slots: list[Slot]) -> Slot:
    """The slot of a ring to overwrite: an empty one, else the one holding the oldest step."""
    steps = [meta.step if meta is not None else None for meta in (s.read_meta() for s in slots)]
    return slots[min(range(len(slots)), key=lambda i: (steps[i] is not None, steps[i] or 0))]


def _commit_word(raw: bytes) -> int:
    """The commit word of a meta file holding the JSON ``raw``: its digest, never 0."""
    return xxhash.xxh3_64_intdigest(raw, seed=len(raw)) | 1


class Slot:
    """One slot of a rank's snapshot ring: its data file and its meta file, both mapped."""

    def __init__(self, directory: Path, index: int) -> None:
        self.data_path = directory / f"slot-{index}.bin"
        self.meta_path = directory / f"slot-{index}.meta"
        self._data: torch.Tensor | None = None
        self._views: tuple[Any, list[torch.Tensor]] | None = None
        self._meta_map: mmap.mmap | None = None  # the meta file, mapped once written by us

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
        _reserve(self.data_path, size)
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
        """Mark the slot incomplete (before its data is overwritten): one store when mapped."""
        if self._meta_map is not None:
            struct.pack_into("<Q", self._meta_map, _COMMIT_AT, 0)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.meta_path)

    def commit(self, meta: SlotMeta, table: str | None = None) -> None:
        self.commit_raw(meta.to_bytes(table))

    def commit_raw(self, raw: bytes) -> None:
        """Publish the meta JSON ``raw`` (the data is complete): the JSON and its length first,
        the commit word last."""
        need = HEADER.size + len(raw)
        mapped = self._meta_map
        if mapped is None or len(mapped) < need:
            mapped = self._map_meta(need)
        else:
            struct.pack_into("<Q", mapped, _COMMIT_AT, 0)
        mapped[HEADER.size:need] = raw
        struct.pack_into("<Q", mapped, 16, len(raw))
        struct.pack_into("<Q", mapped, _COMMIT_AT, _commit_word(raw))

    def _map_meta(self, need: int) -> mmap.mmap:
        """A new meta file with room for ``need`` bytes and some growth, mapped; not committed.
        A new file, not the old one resized: a reader may still hold the old one."""
        if self._meta_map is not None:
            struct.pack_into("<Q", self._meta_map, _COMMIT_AT, 0)
            self._meta_map.close()
            self._meta_map = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.meta_path)
        size = -(-2 * need // _PAGE) * _PAGE  # room for the JSON to grow (step numbers, lengths)
        fd = _reserve(self.meta_path, size, keep_open=True)
        try:
            mapped = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        HEADER.pack_into(mapped, 0, MAGIC, 0, 0, 0)
        self._meta_map = mapped
        return mapped

    def committed_json(self) -> bytes | None:
        """The meta JSON of a committed slot (what :meth:`commit_raw` takes), or None."""
        try:
            raw = self.meta_path.read_bytes()
            magic, word, length, _ = HEADER.unpack_from(raw, 0)
        except (OSError, struct.error):
            return None
        body = raw[HEADER.size:HEADER.size + length]
        if magic != MAGIC or word == 0 or len(body) != length or _commit_word(body) != word:
            return None
        return body

    def read_meta(self) -> SlotMeta | None:
        """The meta of a complete slot, or None (never written, being written, or damaged)."""
        body = self.committed_json()
        if body is None:
            return None
        try:
            meta = SlotMeta.from_bytes(body)
            if self.data_path.stat().st_size != meta.size:
                return None
            return meta
        except (OSError, TypeError, KeyError, ValueError, IndexError, AttributeError, struct.error):
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
        return verified_copies(meta, self.mapped(meta.size))


def _reserve(path: Path, size: int, *, keep_open: bool = False) -> int:
    """Create ``path`` with ``size`` bytes reserved (ENOSPC now, not SIGBUS later); returns
    the open descriptor when ``keep_open`` (else -1)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.close(fd)
        raise
    if keep_open:
        return fd
    os.close(fd)
    return -1
