"""State files in ``torch.save``'s format, written without its CRC pass, tensors at page offsets.

``torch.save`` computes a CRC32 of every record (as much CPU as the write itself for a large
state) and aligns tensor bytes to 64 bytes. A checkpoint file does not need the CRC: its
manifest digest covers every byte (:mod:`distrain.ckpt.digest`). Page-aligned tensor bytes let
:class:`~distrain.ckpt.direct.HashingFile` send them to the disk by direct I/O from a
page-aligned buffer (:func:`aligned_empty`, what async saves stage into). The file is what
``torch.save`` writes with ``compute_crc32=False`` and a 4096-byte storage alignment, options
``torch.load`` reads (its zip reader does not check CRCs).

This uses torch's serializer below ``torch.save`` (``torch._C.PyTorchFileWriter`` and
``torch.serialization._save``): a torch without them gets plain ``torch.save`` (same format as
far as loading goes, only slower to write).
"""

from __future__ import annotations

import mmap
import pickle
from typing import IO, Any

import torch
import torch.serialization

from distrain.ckpt.direct import ALIGNMENT


def save_state(state: Any, file: IO[bytes]) -> None:
    """Write ``state`` to ``file`` as ``torch.load`` reads it; no CRCs, tensors page-aligned."""
    writer_class = getattr(torch._C, "PyTorchFileWriter", None)
    save = getattr(torch.serialization, "_save", None)
    try:
        writer = writer_class(file, False, ALIGNMENT) if writer_class is not None else None
    except TypeError:  # an older signature: no such options
        writer = None
    if writer is None or save is None:
        torch.save(state, file)
        return
    save(state, writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    writer.write_end_of_file()
    file.flush()


def aligned_empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor whose bytes start on a page boundary (an anonymous mapping,
    freed with the tensor), so a file writer can send them to disk by direct I/O."""
    nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes)
    return torch.frombuffer(memory, dtype=dtype, count=shape.numel()).view(shape)
