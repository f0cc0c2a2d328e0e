"""The on-disk side of checkpoints: atomic directories, a verified manifest, retention, a writer.

Layout of a checkpoint root::

    root/
      latest                  # text: the name of the newest committed checkpoint, replaced atomically
      step-00001200/          # one directory per checkpoint, complete or absent
        manifest.json         # kind, step, world size, versions, digest + size of every file
        model.pt ...          # the state files (which ones depends on the kind)
      .tmp-step-00001400-*/   # a save in progress (or killed): never read, removed by the next writer

Why a crash at any instant is harmless: every file is written inside a ``.tmp-`` directory and
fsynced, the manifest is written last, the directory is fsynced and only then renamed to
``step-N`` (a rename is atomic), and the parent is fsynced. A directory named ``step-N`` therefore
always holds a complete checkpoint; whatever a crash leaves behind is a ``.tmp-``/``.trash-``
directory that nothing reads. The manifest carries its own digest, so a bit flip anywhere (in a
state file or in the manifest itself) is caught by :func:`verify`, which names the file.

The store knows nothing about torch: a checkpoint kind (``"full"``: rank 0 writes everything;
``"sharded"``: every rank writes its shard through ``torch.distributed.checkpoint``) writes files
into a :class:`Staging` directory and commits it with its metadata.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from distrain.ckpt import digest as file_digest
from distrain.ckpt.direct import HashingFile
from distrain.ckpt.remote import ObjectPath
from distrain.errors import CheckpointError as CheckpointError  # its home; imported from here too
from distrain.errors import ConfigError

FORMAT = "distrain-checkpoint"
FORMAT_VERSION = 1
KINDS = ("full", "sharded")
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds a pickle that would import or call code; it was not loaded."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt or partial) while looking for the newest valid one."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A checkpoint directory: on disk, or under an object-store URL (read alike).
CheckpointPath = Path | ObjectPath


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The digest the manifest carries of itself (every key but this one, canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _safe_relative(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and name != MANIFEST


class Staging:
    """A checkpoint being written: files go into a hidden directory, :meth:`commit` publishes it."""

    def __init__(self, root: Path, step: int) -> None:
        self.root = root
        self.step = step
        self.path = root / f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        self.files: dict[str, dict[str, Any]] = {}

    def write_file(self, name: str, write: Callable[[IO[bytes]], None]) -> None:
        """Create ``name`` and fill it with ``write(file)``; hashed while written, then fsynced
        (large page-aligned pieces go to the disk by direct I/O, see :mod:`distrain.ckpt.direct`)."""
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(1, thread_name_prefix="distrain-hash") as hasher:
            hashing = HashingFile(target, hasher)
            try:
                try:
                    write(hashing)  # type: ignore[arg-type]  # a file object as far as writers care
                except Exception as error:
                    if hashing.error is None:
                        raise
                    failed = hashing.error
                    if failed.filename is None:
                        failed = OSError(failed.errno, failed.strerror, str(target))
                    raise failed from error
                hashing.close(sync=True)
            finally:
                hashing.close(sync=False)
        self.files[name] = file_digest.record(hashing.digest, hashing.size)

    def write_files(self, writers: dict[str, Callable[[IO[bytes]], None]]) -> None:
        """:meth:`write_file` for each, side by side on threads: serializing, hashing and the
        disk overlap across files (a checkpoint's model and optimizer are similar in size).
        Every write finishes before an error is raised (the first, in ``writers`` order)."""
        with ThreadPoolExecutor(max(len(writers), 1), thread_name_prefix="distrain-write") as pool:
            pending = [pool.submit(self.write_file, name, write) for name, write in writers.items()]
        for future in pending:
            future.result()

    def add_existing(self, name: str) -> None:
        """Record a file something else already wrote into :attr:`path` (e.g. a DCP shard)."""
        target = self.path / name
        with open(target, "rb+") as file:
            os.fsync(file.fileno())
        self.files[name] = file_digest.file_record(target)

    def commit(self, meta: dict[str, Any]) -> Path:
        """Write the manifest, fsync, rename into place. Returns the published directory."""
        data = build_manifest(meta, self.step, self.files)
        with open(self.path / MANIFEST, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        fsync_dir(self.path)
        final = self.root / step_dir_name(self.step)
        if final.exists():  # the same step saved again: the new one replaces it
            _discard(final)
        os.rename(self.path, final)
        fsync_dir(self.root)
        return final

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def build_manifest(meta: dict[str, Any], step: int, files: dict[str, dict[str, Any]]) -> bytes:
    """The manifest of checkpoint ``step`` (its own digest included), as written."""
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind {kind!r} is not one of {KINDS}")
    manifest = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                "files": dict(sorted(files.items()))}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def _write_bytes(file: IO[bytes], *, data: bytes) -> None:
    file.write(data)


def json_writer(value: Any) -> Callable[[IO[bytes]], None]:
    """A writer (for a staging's ``write_files``) of ``value`` as a checkpoint's JSON file.

    Args:
        value: A JSON-able value, encoded now (later changes to it are not written).

    Returns:
        ``write(file)``, which writes the encoded bytes.
    """
    return functools.partial(_write_bytes, data=json.dumps(value, indent=1, sort_keys=True).encode())


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: rename away first (atomic), so it never looks half-deleted."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:12]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    """The outcome of checking one checkpoint directory against its manifest."""

    path: CheckpointPath
    problems: tuple[str, ...]
    manifest: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return not self.problems


def _as_path(path: CheckpointPath | str | os.PathLike[str]) -> CheckpointPath:
    return path if isinstance(path, (Path, ObjectPath)) else Path(path)


def read_manifest(path: CheckpointPath | str) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path``, its self-digest checked."""
    file = _as_path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{MANIFEST}: missing in {path} (not a checkpoint, or partial)") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{MANIFEST}: unreadable in {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{MANIFEST}: in {path} is not a {FORMAT} manifest")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise CheckpointError(f"{MANIFEST}: checksum mismatch in {path} (the manifest is corrupt)")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{MANIFEST}: {path} has format version {manifest['format_version']}, newer than this "
            f"distrain reads ({FORMAT_VERSION}); upgrade distrain")
    return manifest


def verify(path: CheckpointPath | str, *, hashes: bool = True) -> Verification:
    """Check every file against the manifest (size, and digest unless ``hashes=False``)."""
    path = _as_path(path)
    try:
        manifest = read_manifest(path)
    except CheckpointError as error:
        return Verification(path=path, problems=(str(error),), manifest=None)
    problems: list[str] = []
    for name, record in sorted(manifest.get("files", {}).items()):
        target = path / name
        if not _safe_relative(name):
            problems.append(f"{name}: not a file name inside the checkpoint")
            continue
        try:
            size = target.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if isinstance(target, Path) and not target.is_file():
            problems.append(f"{name}: missing")
        elif size != record.get("size"):
            problems.append(f"{name}: size {size} != {record.get('size')} in the manifest")
        elif hashes and (wrong := file_digest.mismatch(target, record)):
            problems.append(f"{name}: {wrong}")
    return Verification(path=path, problems=tuple(problems), manifest=manifest)


def newest_valid(checkpoints: Iterable[tuple[int, CheckpointPath]]) -> Verification | None:
    """The newest of ``checkpoints`` (oldest first) that verifies, on disk or in an object store;
    each newer one skipped is named in a warning."""
    for _, path in reversed(list(checkpoints)):
        result = verify(path)
        if result.ok:
            return result
        warnings.warn(f"skipping checkpoint {path}: {'; '.join(result.problems)}",
                      CheckpointWarning, stacklevel=4)
    return None


def select_for_deletion(
    steps: Iterable[int], *, keep_last: int | None, keep_every: int | None, protect: Iterable[int] = ()
) -> list[int]:
    """Which steps retention removes: all but the last ``keep_last``, multiples of ``keep_every``
    and ``protect`` (the newest valid checkpoint). Pure."""
    ordered = sorted(set(steps))
    if keep_last is None:
        return []
    keep = set(ordered[-keep_last:]) | set(protect)
    if keep_every:
        keep |= {s for s in ordered if s % keep_every == 0}
    return [s for s in ordered if s not in keep]


def check_retention(keep_last: int | None, keep_every: int | None) -> None:
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                  or keep_last < 1):
        raise ConfigError("keep_last", keep_last, "an integer >= 1 or None (keep all)",
                          "e.g. keep_last=3")
    if keep_every is not None and (isinstance(keep_every, bool) or not isinstance(keep_every, int)
                                   or keep_every < 1):
        raise ConfigError("keep_every", keep_every, "a positive number of steps or None",
                          "e.g. keep_every=1000 to also keep every 1000th step")


class CheckpointStore:
    """The checkpoints under one root directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def create(self) -> None:
        """Make the root (and check it is a writable directory) or raise a one-line ConfigError."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex[:12]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise ConfigError("checkpoint root", str(self.root), "a writable directory",
                              f"choose another path ({error.strerror or error})") from None

    def stage(self, step: int) -> Staging:
        return Staging(self.root, step)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Committed checkpoint directories, oldest first (not verified)."""
        if not self.root.is_dir():
            return []
        found = [(parse_step_dir(p.name), p) for p in self.root.iterdir() if p.is_dir()]
        return sorted((step, p) for step, p in found if step is not None)

    def latest_name(self) -> str | None:
        try:
            return (self.root / LATEST).read_text().strip() or None
        except OSError:
            return None

    def set_latest(self, path: Path) -> None:
        """Point ``latest`` at ``path``: write a temporary file, fsync, rename over (atomic)."""
        temp = self.root / f".{LATEST}-{uuid.uuid4().hex[:12]}"
        with open(temp, "w") as file:
            file.write(path.name + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, self.root / LATEST)
        fsync_dir(self.root)

    def remove_stale(self) -> None:
        """Delete what killed writers left behind (``.tmp-``, ``.trash-``, ``.latest-``)."""
        for entry in self.root.iterdir() if self.root.is_dir() else ():
            if entry.name.startswith((".tmp-", ".trash-", f".{LATEST}-")):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def apply_retention(
        self, *, keep_last: int | None, keep_every: int | None, protect: Iterable[int]
    ) -> list[Path]:
        by_step = dict(self.checkpoints())
        doomed = select_for_deletion(by_step, keep_last=keep_last, keep_every=keep_every,
                                     protect=protect)
        for step in doomed:
            _discard(by_step[step])
        return [by_step[s] for s in doomed]

    def newest_valid(self) -> Verification | None:
        """The newest checkpoint that verifies; each newer one skipped is named in a warning."""
        return newest_valid(self.checkpoints())

