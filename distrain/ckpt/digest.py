"""File digests of checkpoint manifests: xxh3-128 for files written now, sha256 still read.

A manifest records each file as ``{"<algorithm>": hexdigest, "size": bytes}``. New files get
``xxh3_128`` (the xxHash library): it catches the same corruption sha256 caught (a flipped
bit, a truncated or swapped file; the chance that a damaged file keeps its digest is 2**-128)
at memory speed, where sha256 cost more CPU than writing the file. Neither is a defence against
someone who rewrites files on purpose: they can rewrite the manifest too (see ``dcp_io``).
The manifest's digest of itself stays sha256: it is a few kB. Manifests written before this
change record ``sha256`` and still verify.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

if TYPE_CHECKING:
    from distrain.ckpt.remote import ObjectPath

ALGORITHM = "xxh3_128"  # what new manifests record
_CHUNK = 8 << 20


class Hasher(Protocol):
    """What :func:`new` returns: ``hashlib``'s interface, which xxhash follows."""

    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


def _constructors() -> dict[str, Any]:
    return {ALGORITHM: xxhash.xxh3_128, "sha256": hashlib.sha256}


def new(algorithm: str = ALGORITHM) -> Hasher:
    """A fresh hasher; ``algorithm`` one of :data:`ALGORITHM` or ``"sha256"``."""
    hasher: Hasher = _constructors()[algorithm]()
    return hasher


def record(hasher: Hasher, size: int, algorithm: str = ALGORITHM) -> dict[str, Any]:
    """A manifest's file record: ``{algorithm: hexdigest, "size": size}``."""
    return {algorithm: hasher.hexdigest(), "size": size}


def file_digest(path: Path | ObjectPath, algorithm: str = ALGORITHM) -> str:
    """The hex digest of the file at ``path`` (on disk or in an object store), read in chunks."""
    hasher = new(algorithm)
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """The record of a file already on disk (what something else wrote, e.g. a DCP shard)."""
    return {ALGORITHM: file_digest(path), "size": Path(path).stat().st_size}


def recorded_algorithm(entry: dict[str, Any]) -> str | None:
    """The algorithm a manifest record carries (the newest known one), or None."""
    return next((name for name in _constructors() if isinstance(entry.get(name), str)), None)


def mismatch(path: Path | ObjectPath, entry: dict[str, Any]) -> str | None:
    """None when the file matches its record's digest, otherwise what is wrong (one phrase)."""
    algorithm = recorded_algorithm(entry)
    if algorithm is None:
        known = " or ".join(_constructors())
        return f"no digest in the manifest (expected {known})"
    if file_digest(path, algorithm) != entry[algorithm]:
        return f"{algorithm} mismatch (the file is corrupt)"
    return None
