"""Checkpoints under an object-store URL: the store protocol of :mod:`distrain.ckpt.store`
without rename or fsync, which object stores do not have.

Layout (the same names as on disk)::

    s3://bucket/run/
      latest                  # the name of the newest committed checkpoint (one small object)
      step-00001200/
        manifest.json         # written LAST: a step directory without it is not a checkpoint
        model.pt ...

The commit: every data object is uploaded while it is serialized (a PUT, or a multipart upload
that becomes visible only when complete: :mod:`distrain.ckpt.upload`), then the manifest with
the size and digest of each, then ``latest``. A reader trusts a step directory only when its
manifest exists and every object matches it (:func:`distrain.ckpt.store.verify`), so a save
killed or cut off at any point leaves at worst objects that nothing reads; the next writer
removes them. Saving a step that already exists first deletes its manifest (it stops being a
checkpoint), then rewrites it. Retention deletes a checkpoint's manifest first, then its
objects, and only after the new one is committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from distrain.ckpt.remote import ObjectPath, Remote, is_url
from distrain.ckpt.store import (
    LATEST,
    MANIFEST,
    CheckpointStore,
    Verification,
    build_manifest,
    newest_valid,
    parse_step_dir,
    select_for_deletion,
    step_dir_name,
)
from distrain.ckpt.upload import open_upload
from distrain.errors import ConfigError

DIGESTS_PREFIX = ".digests-"  # per-writer records of the objects it uploaded (sharded saves)


class ObjectStaging:
    """A checkpoint being written straight into its step directory; :meth:`commit` writes the
    manifest that makes it one. The interface of :class:`distrain.ckpt.store.Staging`."""

    def __init__(self, root: ObjectPath, step: int) -> None:
        self.root = root
        self.step = step
        self.path = root / step_dir_name(step)
        if self.path.remote.names(self.path.url):  # an older save of this step: void it, then go
            self.path.remote.remove((self.path / MANIFEST).url)
            self.path.remote.remove(self.path.url, recursive=True)
        self.files: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._serializing = threading.Lock()

    def write_file(self, name: str, write: Callable[[IO[bytes]], None]) -> None:
        upload = open_upload(self.path.remote, (self.path / name).url)
        try:
            # One object serialized at a time: two at once share the CPU and both uploads start
            # late; this way each upload starts once its object is done, beside the next one.
            with self._serializing:
                write(upload)  # type: ignore[arg-type]  # a file object as far as writers care
            record = upload.finish()
        except BaseException:
            upload.abort()
            raise
        with self._lock:
            self.files[name] = record

    def write_files(self, writers: dict[str, Callable[[IO[bytes]], None]]) -> None:
        """:meth:`write_file` for each, side by side; every write ends before an error is raised."""
        with ThreadPoolExecutor(max(len(writers), 1), thread_name_prefix="distrain-upload") as pool:
            pending = [pool.submit(self.write_file, name, write) for name, write in writers.items()]
        for future in pending:
            future.result()

    def add_written(self) -> None:
        """Take in the records that the writers of a sharded save uploaded next to their objects
        (:data:`DIGESTS_PREFIX`); every object in the directory must have one."""

        names = self.path.remote.names(self.path.url)
        for name in names:
            if name.startswith(DIGESTS_PREFIX):
                records = json.loads((self.path / name).read_bytes())
                self.files.update({k: v for k, v in records.items() if k not in self.files})
                self.path.remote.remove((self.path / name).url)
        unrecorded = [n for n in names if not n.startswith(DIGESTS_PREFIX) and n not in self.files]
        if unrecorded:
            raise OSError(f"{self.path}: objects without a digest record: {', '.join(unrecorded)}")

    def commit(self, meta: dict[str, Any]) -> ObjectPath:
        (self.path / MANIFEST).write_bytes(build_manifest(meta, self.step, self.files))
        return self.path

    def abort(self) -> None:
        # An unreachable store: what is left has no manifest and the next writer removes it.
        with contextlib.suppress(OSError):
            self.path.remote.remove(self.path.url, recursive=True)


class ObjectStore:
    """The checkpoints under one object-store URL: the interface of
    :class:`distrain.ckpt.store.CheckpointStore`."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 remote: Remote | None = None) -> None:
        """``remote``: the connection to use (one of ``url``'s root), instead of a new one."""
        remote = remote or Remote(url, storage_options)
        self.root = ObjectPath(remote, remote.url)
        self.storage_options = dict(storage_options or {})

    @property
    def remote(self) -> Remote:
        return self.root.remote

    def create(self) -> None:
        """Check the root can be listed and written, or raise a one-line ConfigError."""
        probe = self.root / f".probe-{os.getpid()}-{threading.get_ident()}"
        try:
            self.remote.make_root()
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise ConfigError("checkpoint root", self.root.url, "a writable object-store location",
                              f"check the bucket, credentials and endpoint "
                              f"(AWS_ENDPOINT_URL, storage_options=) ({error.strerror or error})") from None

    def stage(self, step: int) -> ObjectStaging:
        return ObjectStaging(self.root, step)

    def checkpoints(self) -> list[tuple[int, ObjectPath]]:
        """Step directories holding a manifest, oldest first (not verified)."""
        found = []
        for name in self.remote.names(self.root.url):
            step = parse_step_dir(name)
            if step is not None and (self.root / name / MANIFEST).is_file():
                found.append((step, self.root / name))
        return sorted(found, key=lambda item: item[0])

    def latest_name(self) -> str | None:
        try:
            return (self.root / LATEST).read_text().strip() or None
        except OSError:
            return None

    def set_latest(self, path: ObjectPath) -> None:
        (self.root / LATEST).write_bytes((path.name + "\n").encode())

    def remove_stale(self) -> None:
        """Delete step directories without a manifest (saves that never committed)."""
        for name in self.remote.names(self.root.url):
            path = self.root / name
            if name.startswith(".probe-") or (parse_step_dir(name) is not None
                                              and not (path / MANIFEST).is_file()):
                self.remote.remove(path.url, recursive=True)

    def apply_retention(self, *, keep_last: int | None, keep_every: int | None,
                        protect: Iterable[int]) -> list[ObjectPath]:
        by_step = dict(self.checkpoints())
        doomed = select_for_deletion(by_step, keep_last=keep_last, keep_every=keep_every,
                                     protect=protect)
        for step in doomed:
            self.remote.remove((by_step[step] / MANIFEST).url)  # no longer a checkpoint, then gone
            self.remote.remove(by_step[step].url, recursive=True)
        return [by_step[s] for s in doomed]

    def newest_valid(self) -> Verification | None:
        """The newest checkpoint that verifies; each newer one skipped is named in a warning."""
        return newest_valid(self.checkpoints())


def open_store(root: str | os.PathLike[str],
               storage_options: Mapping[str, Any] | None = None) -> CheckpointStore | ObjectStore:
    """The store of ``root``: a directory on disk, or an fsspec URL (``file://`` is a directory)."""
    if is_url(root):
        text = str(root)
        if text.startswith("file://"):
            return CheckpointStore(Path(text[len("file://"):]))
        return ObjectStore(text, storage_options)
    return CheckpointStore(root)


def checkpoint_path(text: str, storage_options: Mapping[str, Any] | None = None) -> Path | ObjectPath:
    """A path or URL given by a user (e.g. on the command line) as something to read from."""
    store = open_store(text, storage_options)
    return store.root
