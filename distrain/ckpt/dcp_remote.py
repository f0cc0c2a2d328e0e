"""``torch.distributed.checkpoint`` on an object store, through :class:`distrain.ckpt.remote.Remote`.

torch's own ``FsspecWriter`` opens a streaming fsspec file per shard and, with its default
``sync_files=True``, calls ``os.fsync(stream.fileno())`` on it, which S3 files do not support
(pytorch issue 142396; torch 2.14 only downgrades the error to a warning). Its
``.metadata`` goes through a temporary object and a rename (a copy on S3). Neither is needed
here: durability comes from distrain's manifest, written after every object is complete. So
:class:`ObjectFileSystem` gives DCP's ``FileSystemWriter`` streams that upload each shard while
it is written, hashing it on the way (:mod:`distrain.ckpt.upload`: parallel parts, retried), with
``sync_files=False``; the writer on each rank then uploads the digests of what it wrote
(``.digests-*.json``), which rank 0 folds into the manifest without reading a shard back.
Reading gives DCP each shard whole (fetched in parallel ranged parts) as an in-memory stream.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import uuid
from collections.abc import Generator
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystemBase

from distrain.ckpt.objstore import DIGESTS_PREFIX
from distrain.ckpt.remote import ObjectPath, Remote
from distrain.ckpt.upload import open_upload


class ObjectFileSystem(FileSystemBase):
    """DCP's filesystem interface over a :class:`Remote`; paths are URLs. Records the digest and
    size of every object it writes (by name) in :attr:`records`."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self.records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        url = os.fspath(path)
        if "r" in mode:
            yield io.BytesIO(self.remote.get(url))
            return
        upload = open_upload(self.remote, url)
        try:
            yield upload  # type: ignore[misc]  # write/tell/flush: all DCP's writer uses
            record = upload.finish()
        except BaseException:
            upload.abort()
            raise
        with self._lock:
            self.records[url.rsplit("/", 1)[-1]] = record

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str:
        return f"{os.fspath(path).rstrip('/')}/{suffix}"

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        """DCP's ``.metadata.tmp`` -> ``.metadata``: a copy and a delete on an object store."""
        old, new = os.fspath(path), os.fspath(new_path)
        data = self.remote.get(old)
        self.remote.put(new, data)
        self.remote.remove(old)
        with self._lock:
            record = self.records.pop(old.rsplit("/", 1)[-1], None)
            if record is not None:
                self.records[new.rsplit("/", 1)[-1]] = record

    def init_path(self, path: str | os.PathLike[str]) -> str:
        return os.fspath(path)

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        """Object stores have no directories."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return "://" in os.fspath(checkpoint_id)

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return self.remote.is_file(os.fspath(path))

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        self.remote.remove(os.fspath(path))

    def take_records(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            records, self.records = self.records, {}
        return records


class ObjectWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` writing to ``url`` through :class:`ObjectFileSystem`, no fsync;
    after its shards (every rank) and after ``.metadata`` (the coordinator) it uploads their
    digests next to them."""

    def __init__(self, url: str, remote: Remote) -> None:
        super().__init__(url, sync_files=False)
        self.fs: ObjectFileSystem = ObjectFileSystem(remote)  # type: ignore[assignment]
        self.path = url

    def _upload_records(self) -> None:
        records = self.fs.take_records()
        if records:
            name = f"{DIGESTS_PREFIX}{uuid.uuid4().hex[:12]}.json"
            self.fs.remote.put(self.fs.concat_path(self.path, name), json.dumps(records).encode())

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)
        future.wait()  # done already: the parent writes synchronously and returns a set future
        self._upload_records()
        return future

    def finish(self, metadata: Any, results: Any) -> None:
        super().finish(metadata, results)
        self._upload_records()


def reader_filesystem(path: ObjectPath) -> ObjectFileSystem:
    """The filesystem a ``FileSystemReader`` of checkpoint ``path`` reads through."""
    return ObjectFileSystem(path.remote)
