"""Objects uploaded while they are written: file objects that ``torch.save`` (or DCP) writes into.

:func:`open_upload` gives a write-only file object for one object under a
:class:`~distrain.ckpt.remote.Remote`. Each one hashes the bytes as they come
(:mod:`distrain.ckpt.digest`), so the manifest's record needs no second read; :meth:`finish`
makes the object visible and returns that record, :meth:`abort` leaves nothing visible.

* On S3 (:class:`MultipartUpload`) an object larger than :data:`SINGLE_PUT` is streamed: every
  full part (:data:`PART_SIZE`) is handed to a small pool that uploads it while serialization
  goes on, with at most :data:`IN_FLIGHT` parts in flight (a writer faster than the network
  waits, so memory stays bounded by a few parts, not the object). A smaller object is one PUT. A
  multipart object becomes visible only when completed, so a failed or killed save leaves
  nothing readable (the upload is aborted; S3 lifecycle rules expire what a kill leaves).
* Elsewhere (``memory://``, ``gs://``, ...: fsspec has no common multipart interface) the bytes
  are kept in memory and written whole by :meth:`finish` (:class:`BufferedUpload`).

The bytes are copied once, from the writer's buffer into a part; the part itself is the
request body.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from distrain.ckpt import digest as file_digest
from distrain.ckpt.remote import PART_SIZE, Remote

IN_FLIGHT = 4  # parts uploading at once per object (each a PART_SIZE buffer)
# Up to this size an object is one PUT, as s3fs does (its put/pipe: under 2 x 50 MiB): one
# request, and no multipart completion, which servers such as moto pay for by copying every part.
SINGLE_PUT = 100 << 20
MAX_PARTS = 10_000  # S3's limit: the part size doubles every _GROW_EVERY parts to stay under it
_GROW_EVERY = 1_000


class BufferedUpload:
    """Keeps the object in memory, hashing as it comes; :meth:`finish` uploads it whole."""

    def __init__(self, remote: Remote, url: str) -> None:
        self.remote = remote
        self.url = url
        self.digest = file_digest.new()
        self._buffer = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self._buffer += view
        return view.nbytes

    def tell(self) -> int:
        return len(self._buffer)

    def flush(self) -> None:
        """Nothing to flush: the object is sent whole by :meth:`finish`."""

    def close(self) -> None:
        """Nothing to release here: :meth:`finish` or :meth:`abort` ends the upload."""

    @property
    def closed(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def finish(self) -> dict[str, Any]:
        """Upload the object; its manifest record (digest and size)."""
        self.remote.put(self.url, self._buffer)
        return file_digest.record(self.digest, len(self._buffer))

    def abort(self) -> None:
        self._buffer = bytearray()


class MultipartUpload(BufferedUpload):
    """An S3 object streamed in parts while it is written (see the module docstring)."""

    def __init__(self, remote: Remote, url: str, *, part_size: int = PART_SIZE,
                 in_flight: int = IN_FLIGHT, single_put: int = SINGLE_PUT) -> None:
        super().__init__(remote, url)
        self.part_size = part_size
        self.single_put = single_put
        self.in_flight = in_flight
        self.bucket, self.key, _ = remote.fs.split_path(remote.key(url))
        self._part = bytearray(part_size)
        self._fill = 0  # bytes of self._part written so far
        self._size = 0
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._held: list[bytearray] = []  # full parts kept until the object outgrows one PUT
        self._slots = threading.BoundedSemaphore(in_flight)
        self._failed: BaseException | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        written = view.nbytes
        self._size += written
        while view.nbytes:
            take = min(len(self._part) - self._fill, view.nbytes)
            self._part[self._fill:self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == len(self._part):
                self._part_full()
        return written

    def tell(self) -> int:
        return self._size

    def _part_full(self) -> None:
        kept = sum(len(part) for part in self._held) + len(self._part)
        if self._upload_id is None and kept <= self.single_put:
            self._held.append(self._part)
        else:
            held, self._held = self._held, []
            for part in [*held, self._part]:
                self._send(part)
        self._part = bytearray(self.part_size * 2 ** (len(self._parts) // _GROW_EVERY))
        self._fill = 0

    def _send(self, part: bytearray) -> None:
        """Hand ``part`` (full, or the last one) to the pool; waits while IN_FLIGHT are out."""
        if self._failed is not None:
            raise self._failed  # a part failed for good: stop serializing into a dead upload
        pool = self._pool
        if pool is None:
            made = self._s3("start upload", "create_multipart_upload")
            self._upload_id = str(made["UploadId"])
            self._pool = pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="distrain-part")
        if len(self._parts) >= MAX_PARTS:
            raise OSError(f"{self.url}: more than {MAX_PARTS} parts")
        self._slots.acquire()
        number = len(self._parts) + 1
        future = pool.submit(self._s3, f"upload part {number}", "upload_part",
                                   PartNumber=number, UploadId=self._upload_id, Body=part)
        future.add_done_callback(self._part_done)
        self._parts.append(future)

    def _part_done(self, future: Future[dict[str, Any]]) -> None:
        self._slots.release()
        if future.cancelled():  # by abort(): nothing to report
            return
        error = future.exception()
        if error is not None and self._failed is None:
            self._failed = error

    def _s3(self, what: str, method: str, **kwargs: Any) -> dict[str, Any]:
        """One S3 request, retried by the Remote's policy (an OSError naming the object)."""
        from fsspec.asyn import sync

        fs = self.remote.fs
        # s3fs's request helper (what its own pipe/put use): retries throttling, maps errors.
        call = fs._call_s3
        return self.remote.call(what, self.url, lambda: sync(
            fs.loop, call, method, Bucket=self.bucket, Key=self.key, **kwargs))

    def finish(self) -> dict[str, Any]:
        try:
            del self._part[self._fill:]
            if self._upload_id is None:  # small enough for a single PUT
                pieces = [*self._held, self._part]
                body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                self._held = []
                self._s3("upload", "put_object", Body=body)
            else:
                if self._fill:
                    self._send(self._part)
                etags = [future.result()["ETag"] for future in self._parts]
                parts = [{"PartNumber": n, "ETag": tag} for n, tag in enumerate(etags, 1)]
                self._s3("complete upload", "complete_multipart_upload", UploadId=self._upload_id,
                         MultipartUpload={"Parts": parts})
                self.remote.fs.invalidate_cache(self.remote.key(self.url))
        except BaseException:
            self.abort()
            raise
        self._close_pool()
        self._part = bytearray()
        return file_digest.record(self.digest, self._size)

    def abort(self) -> None:
        """Wait for the parts in flight, then drop the upload (best effort: the store may be
        down; an incomplete multipart upload is never visible as an object)."""
        self._close_pool()
        upload, self._upload_id = self._upload_id, None
        self._part = bytearray()
        self._held = []
        if upload is not None:
            with contextlib.suppress(Exception):
                self._s3("abort upload", "abort_multipart_upload", UploadId=upload)

    def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def open_upload(remote: Remote, url: str) -> BufferedUpload:
    """A file object whose bytes become the object at ``url`` (see the module docstring)."""
    if remote.protocol in ("s3", "s3a"):
        return MultipartUpload(remote, url)
    return BufferedUpload(remote, url)
