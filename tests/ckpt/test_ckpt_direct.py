"""State files written without torch's CRC pass, tensors on page offsets, by direct I/O.

Real files on the test's temporary directory; what ``torch.load`` and the manifest digest see.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch

from distrain.ckpt import digest
from distrain.ckpt.direct import ALIGNMENT, HashingFile
from distrain.ckpt.tensorfile import aligned_empty, save_state


def direct_io_works(directory: Path) -> bool:
    """Whether this file system takes O_DIRECT (tmpfs before Linux 6.6 does not)."""
    probe = directory / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def staged_state() -> dict[str, Any]:
    """Tensors in page-aligned staging buffers (as an async save holds them), one whose size is
    not a multiple of a page (its tail goes through the page cache), a small one, a shared one."""
    torch.manual_seed(0)
    big = aligned_empty(torch.Size([1000, 517]), torch.float32).copy_(torch.randn(1000, 517))
    wide = aligned_empty(torch.Size([3 << 18]), torch.float64)
    wide.copy_(torch.randn(3 << 18, dtype=torch.float64))
    small = torch.arange(7)
    return {"big": big, "wide": wide, "small": small, "again": small, "nested": {"step": 3, "lr": [0.1]}}


def write(path: Path, state: Any, *, direct: bool) -> HashingFile:
    file = HashingFile(path, direct=direct)
    try:
        save_state(state, file)  # type: ignore[arg-type]  # a file object as far as torch cares
        file.close(sync=True)
    finally:
        file.close(sync=False)
    return file


def data_offsets(path: Path) -> dict[str, int]:
    """Where each tensor record's bytes start in the zip file (from its local header)."""
    offsets = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            if "/data/" in info.filename:
                raw.seek(info.header_offset)
                header = raw.read(30)
                name_length, extra_length = struct.unpack("<HH", header[26:30])
                offsets[info.filename] = info.header_offset + 30 + name_length + extra_length
    return offsets


def test_state_file_loads_with_torch_digest_covers_every_byte_tensors_on_pages(tmp_path: Path) -> None:
    state = staged_state()
    assert all(state[k].data_ptr() % ALIGNMENT == 0 for k in ("big", "wide"))
    written = write(tmp_path / "state.pt", state, direct=True)
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert loaded.keys() == state.keys() and loaded["nested"] == state["nested"]
    assert all(torch.equal(loaded[k], state[k]) for k in ("big", "wide", "small", "again"))
    assert loaded["again"].data_ptr() == loaded["small"].data_ptr()  # one storage, as torch.save keeps it
    offsets = data_offsets(tmp_path / "state.pt")
    assert len(offsets) == 3 and all(offset % ALIGNMENT == 0 for offset in offsets.values()), offsets
    assert written.size == (tmp_path / "state.pt").stat().st_size
    assert digest.record(written.digest, written.size) == digest.file_record(tmp_path / "state.pt")
    tensor_bytes = sum(state[k].nbytes for k in ("big", "wide"))
    if direct_io_works(tmp_path):  # whole pages of the two large tensors, the tails buffered
        assert tensor_bytes - 2 * ALIGNMENT < written.direct_bytes <= tensor_bytes
    else:
        assert written.direct_bytes == 0


@pytest.mark.parametrize("where", ["tmp_path", "shm"])
def test_direct_io_and_the_page_cache_write_the_same_bytes(tmp_path: Path, where: str) -> None:
    if where == "shm" and not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    directory = tmp_path if where == "tmp_path" else Path("/dev/shm")
    state = staged_state()
    # torch.save writes a view's whole storage, so the storage itself must start off a page:
    # a numpy buffer one byte past its allocation (numpy aligns allocations to at most 64 bytes).
    unaligned = torch.from_numpy(numpy.full(ALIGNMENT * 300 + 1, 7, dtype=numpy.uint8)[1:])
    assert unaligned.untyped_storage().data_ptr() % ALIGNMENT != 0
    state["unaligned"] = unaligned
    names = [directory / f"distrain-test-{os.getpid()}-{n}.pt" for n in ("direct", "cached")]
    try:
        direct = write(names[0], state, direct=True)
        cached = write(names[1], state, direct=False)
        assert names[0].read_bytes() == names[1].read_bytes()
        assert direct.digest.hexdigest() == cached.digest.hexdigest() == digest.file_digest(names[0])
        assert cached.direct_bytes == 0
        assert direct.direct_bytes <= sum(state[k].nbytes for k in ("big", "wide"))  # never the unaligned one
    finally:
        for name in names:
            name.unlink(missing_ok=True)
