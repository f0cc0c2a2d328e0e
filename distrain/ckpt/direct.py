"""A checkpoint file written by offset, hashed as it is written; large aligned pieces by direct I/O.

A buffered ``write()`` copies every byte into the page cache (kernel CPU in the writer's thread),
and the kernel's flusher threads then write those pages back at normal priority, beside
training. A piece that starts at an :data:`ALIGNMENT`-aligned file offset from an
:data:`ALIGNMENT`-aligned buffer goes to the disk straight from that buffer instead
(``O_DIRECT``): no copy, no dirty pages, no writeback threads, and nothing of the checkpoint
evicts training's data from the page cache. :mod:`distrain.ckpt.tensorfile` lays tensor bytes
out that way and stages them in page-aligned buffers. Everything else (headers, padding, the
unaligned tail of a piece, a file system without ``O_DIRECT``) is written through the page cache.

The digest covers every byte in file order, computed from the same buffers in the same pass
(no second read); a large piece is hashed on a helper thread while it is written (xxhash and the
write both release the GIL). :meth:`HashingFile.close` fsyncs once and drops the file's cached
pages (``POSIX_FADV_DONTNEED``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from distrain.ckpt import digest as file_digest

ALIGNMENT = 4096  # file offset and memory alignment of direct writes (a page; >= any block size)
DIRECT_BYTES = 1 << 20  # smaller pieces: not worth a direct write's wait
PARALLEL_BYTES = 1 << 20  # below this handing the digest to the helper costs more than it saves
_SMALL_BUFFER = 1 << 16  # small writes (zip headers, padding) are gathered into one pwrite
_MAX_PWRITE = 1 << 30  # Linux writes at most ~2 GiB per call


def _writeback_starter() -> Callable[[int], None]:
    """``start(fd)``: ask the kernel to begin writing the file's dirty pages now (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; it does not wait). The closing fsync then has
    little left to do. Elsewhere a no-op."""
    try:
        sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd: None
    sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    write_only = 2  # SYNC_FILE_RANGE_WRITE; offset 0, length 0: the whole file

    def start(fd: int) -> None:
        sync_file_range(fd, 0, 0, write_only)  # best effort: an error only means no head start

    return start


_start_writeback = _writeback_starter()


def _address(view: memoryview) -> int:
    """The address of a contiguous buffer's first byte (read-only buffers included)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class HashingFile:
    """A write-only file object over a new file ``path``: hashes and counts what passes through.

    ``direct``: try ``O_DIRECT`` for aligned pieces (it falls back to the page cache for good
    at the first refusal: a file system without it, a larger alignment requirement).
    """

    def __init__(self, path: Path, hasher: ThreadPoolExecutor | None = None, *, direct: bool = True) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        self._direct_fd: int | None = None
        self._direct = direct and hasattr(os, "O_DIRECT")
        self._hasher = hasher
        self._small = bytearray()
        self.digest = file_digest.new()
        self.size = 0  # bytes taken so far (the file offset of the next write)
        self._written = 0  # bytes on their way to the file (the rest is in ``_small``)
        self.direct_bytes = 0  # of ``size``, how many went to the disk by direct I/O
        self.error: OSError | None = None  # torch's writer turns a failed write into a vague error

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        size = view.nbytes
        try:
            if size < PARALLEL_BYTES:
                self.digest.update(view)
                self._small += view
                self.size += size
                if len(self._small) >= _SMALL_BUFFER:
                    self._flush_small()
                return size
            self._flush_small()
            hashed = self._hasher.submit(self.digest.update, view) if self._hasher is not None else None
            try:
                if hashed is None:
                    self.digest.update(view)
                self._write_large(view)
            finally:
                if hashed is not None:
                    hashed.result()  # the caller may reuse ``data`` once write returns
            self.size += size
            return size
        except OSError as error:
            self.error = self.error or error
            raise

    def _write_large(self, view: memoryview) -> None:
        offset = self._written
        direct = 0
        if self._direct and view.nbytes >= DIRECT_BYTES and offset % ALIGNMENT == 0 \
                and _address(view) % ALIGNMENT == 0:
            direct = view.nbytes - view.nbytes % ALIGNMENT
            try:
                self._pwrite(self._direct_descriptor(), view[:direct], offset)
                self.direct_bytes += direct
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # no direct I/O here
                    raise
                self._direct = False
                direct = 0
        self._pwrite(self._fd, view[direct:], offset + direct)
        if not direct:
            _start_writeback(self._fd)
        self._written = offset + view.nbytes

    def _direct_descriptor(self) -> int:
        if self._direct_fd is None:
            self._direct_fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        return self._direct_fd

    @staticmethod
    def _pwrite(fd: int, view: memoryview, offset: int) -> None:
        while view.nbytes:
            done = os.pwrite(fd, view[:_MAX_PWRITE], offset)
            view, offset = view[done:], offset + done

    def _flush_small(self) -> None:
        if self._small:
            self._pwrite(self._fd, memoryview(self._small), self._written)
            self._written += len(self._small)
            self._small = bytearray()

    def flush(self) -> None:
        try:
            self._flush_small()
        except OSError as error:
            self.error = self.error or error
            raise

    def close(self, *, sync: bool) -> None:
        """Write what is gathered, fsync (when ``sync``), drop the cached pages, close. Closing
        again does nothing."""
        if self._fd < 0:
            return
        try:
            if sync:
                self.flush()
                os.fsync(self._fd)
                if hasattr(os, "posix_fadvise"):  # clean after the fsync: the cache need not keep them
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            for fd in (self._direct_fd, self._fd):
                if fd is not None:
                    os.close(fd)
            self._direct_fd, self._fd = None, -1
