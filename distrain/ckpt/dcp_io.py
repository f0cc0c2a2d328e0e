"""Reading ``torch.distributed.checkpoint`` (DCP) files without running pickled code.

DCP stores a checkpoint as one ``__<rank>_0.distcp`` file per writing rank plus a ``.metadata``
file. Two of DCP's own read paths unpickle with full power: ``FileSystemReader.read_metadata``
calls ``pickle.load`` on ``.metadata``, and ``DefaultLoadPlanner.load_bytes`` reads every
non-tensor value (optimizer hyper-parameters, ``param_groups``) with
``torch.load(weights_only=False)``. A crafted checkpoint could run code through either, and an
attacker who can replace a file can also rewrite the manifest, so the manifest's sha256 alone
is no defence. Here:

* ``.metadata`` is read by an unpickler that resolves only DCP's own metadata classes, torch
  dtypes/layouts/sizes and paths (the globals a genuine file refers to), and the result is
  checked: every shard it points at must be a ``.distcp`` file listed in the manifest;
* non-tensor values are read with ``torch.load(weights_only=True)``, as tensors already are.

:func:`read_full` assembles whole (unsharded) tensors with no process group: ``distrain ckpt
consolidate`` and loading a sharded checkpoint into a process of its own use it.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from distrain.ckpt.dcp_names import METADATA_FILE, SHARD_SUFFIX
from distrain.ckpt.remote import ObjectPath
from distrain.ckpt.store import CheckpointError, CheckpointPath, UnsafeCheckpointError

_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    (_DCP_META, "Metadata"), (_DCP_META, "TensorStorageMetadata"), (_DCP_META, "BytesStorageMetadata"),
    (_DCP_META, "ChunkStorageMetadata"), (_DCP_META, "TensorProperties"), (_DCP_META, "MetadataIndex"),
    (_DCP_META, "StorageMeta"), (_DCP_META, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allowed set (an attack, not corruption)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a genuine DCP ``.metadata`` refers to (pickle's documented
    "restricting globals" pattern); anything else stops the load before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _ForbiddenGlobal(f"global {module}.{name} is not allowed in DCP metadata")


def _as_path(path: CheckpointPath | str) -> CheckpointPath:
    return path if isinstance(path, ObjectPath) else Path(path)


def read_metadata(path: CheckpointPath | str, shard_files: Iterable[str]) -> Metadata:
    """The ``.metadata`` of checkpoint ``path``, unpickled safely and checked against
    ``shard_files`` (the ``.distcp`` names the manifest lists)."""
    target = _as_path(path) / METADATA_FILE
    try:
        data = target.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{target}: cannot be read: {error.strerror or error}") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except _ForbiddenGlobal as error:
        raise UnsafeCheckpointError(
            f"refusing to load {target}: it holds a pickle that would run code or build arbitrary "
            f"objects ({error}); only DCP metadata classes are loaded. Do not load this checkpoint "
            "unless you trust its source") from None
    except Exception as error:  # truncated or garbled: a corrupt file, not an attack
        raise CheckpointError(f"{target}: not readable DCP metadata: {error!r}") from None
    _check_metadata(target, metadata, set(shard_files))
    return metadata


def _check_metadata(target: CheckpointPath, metadata: Any, shards: set[str]) -> None:
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{target}: not DCP metadata ({type(metadata).__name__})")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(entry, (TensorStorageMetadata, BytesStorageMetadata)):
            raise CheckpointError(f"{target}: unexpected entry {key!r} ({type(entry).__name__})")
    paths = metadata.planner_data if metadata.planner_data is not None else {}
    if not isinstance(paths, dict) or not all(
            isinstance(path, (tuple, list)) and all(
                isinstance(p, str) or (type(p) is int and 0 <= p < 1 << 20) for p in path)
            for path in paths.values()):
        raise CheckpointError(f"{target}: unexpected key paths in the DCP metadata")
    for index, info in (metadata.storage_data or {}).items():
        relative = getattr(info, "relative_path", None)
        if relative not in shards:  # also stops "../" paths out of the checkpoint
            raise UnsafeCheckpointError(
                f"refusing to load {target}: {getattr(index, 'fqn', index)!r} points at "
                f"{relative!r}, which is not a shard listed in the manifest")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{target}: {relative} uses storage transforms "
                                  f"{info.transform_descriptors}, which distrain does not read")
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise CheckpointError(f"{target}: bad offset/length for {getattr(index, 'fqn', index)!r}")


class VerifiedReader(FileSystemReader):
    """A ``FileSystemReader`` handing DCP the metadata :func:`read_metadata` already checked.

    ``read_metadata`` takes no ``rank`` argument, so DCP never falls back to per-rank metadata.
    """

    def __init__(self, path: CheckpointPath, metadata: Metadata) -> None:
        super().__init__(str(path) if isinstance(path, ObjectPath) else path)
        if isinstance(path, ObjectPath):  # shards read whole from the store, in parallel parts
            from distrain.ckpt.dcp_remote import reader_filesystem

            self.fs = reader_filesystem(path)  # type: ignore[assignment]  # DCP's own base type
            self.path = path.url
        self._checked = metadata

    def read_metadata(self) -> Metadata:  # type: ignore[override]
        if getattr(self._checked, "storage_meta", None) is None:
            self._checked.storage_meta = StorageMeta()
        self._checked.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
        return self._checked


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor values load with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            detail = next((ln.strip() for ln in str(error).splitlines() if "GLOBAL" in ln),
                          str(error).splitlines()[0])
            raise UnsafeCheckpointError(
                f"refusing to load the value {fqn!r}: it holds a pickle that would run code "
                f"({detail}); only tensors and plain values are loaded (weights_only=True)") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def dcp_load(state: dict[str, Any], path: CheckpointPath, metadata: Metadata, *,
             no_dist: bool = False) -> None:
    """``torch.distributed.checkpoint.load`` through the safe reader and planner; DCP's
    per-rank exception bundle becomes one :class:`CheckpointError` (unsafe content re-raised)."""
    import torch.distributed.checkpoint as dcp

    try:
        with single_process_quietly():
            dcp.load(state, storage_reader=VerifiedReader(path, metadata),
                     planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as error:
        raise dcp_failure(error, f"cannot load checkpoint {path}") from None


@contextlib.contextmanager
def single_process_quietly() -> Iterator[None]:
    """Without a process group DCP warns that it assumes a single process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single")
        yield


def dcp_failure(error: CheckpointException, what: str) -> CheckpointError:
    """DCP's bundle of per-rank failures as one error: ours as raised, others summarised."""
    failures = [exc for exc, _ in error.failures.values()]
    for failure in failures:
        if isinstance(failure, UnsafeCheckpointError):
            return failure
    for failure in failures:
        if isinstance(failure, CheckpointError):
            return failure
    ranks = ", ".join(str(r) for r in sorted(error.failures))
    detail = "; ".join(f"{type(f).__name__}: {f}".splitlines()[0] for f in failures[:2])
    return CheckpointError(f"{what} (ranks {ranks}): {detail}")


def shard_names(manifest: Mapping[str, Any]) -> list[str]:
    """The ``.distcp`` files a sharded checkpoint's manifest lists."""
    return sorted(name for name in manifest.get("files", {}) if name.endswith(SHARD_SUFFIX))


def read_object(path: CheckpointPath, manifest: Mapping[str, Any], name: str) -> dict[str, Any]:
    """:func:`read_full` of object ``name`` of checkpoint ``path`` (metadata read safely first)."""
    return read_full(path, read_metadata(path, shard_names(manifest)), name)


def object_paths(metadata: Metadata) -> dict[str, tuple[Any, ...]]:
    """Flat DCP key -> path of keys inside the saved state (``("model", "fc.weight")``)."""
    data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    return {key: tuple(data.get(key, (key,))) for key in metadata.state_dict_metadata}


def read_full(path: CheckpointPath, metadata: Metadata, name: str) -> dict[str, Any]:
    """The whole (unsharded) state saved under object ``name``, read with no process group.

    A module comes back as its flat ``state_dict`` (``{"fc.weight": tensor}``); other states
    keep their nesting (an optimizer: ``{"state": {...}, "param_groups": [...]}``).
    """
    from torch.distributed.checkpoint._traverse import set_element

    paths = {key: p for key, p in object_paths(metadata).items() if len(p) > 1 and p[0] == name}
    if not paths:
        raise CheckpointError(f"checkpoint {path} holds no sharded object {name!r}")
    template: dict[str, Any] = {}  # nested as saved; DCP flattens it to the saved keys again
    for key, where in paths.items():
        entry = metadata.state_dict_metadata[key]
        if isinstance(entry, TensorStorageMetadata):
            set_element(template, where, torch.empty(entry.size, dtype=entry.properties.dtype))
        else:
            set_element(template, where, None)  # replaced by load_bytes
    dcp_load(template, path, metadata, no_dist=True)
    return dict(template[name])


def describe(metadata: Metadata) -> dict[str, list[tuple[str, str, int, int]]]:
    """Per saved object: (key, "shape dtype" | "value", elements, chunks) of every entry."""
    out: dict[str, list[tuple[str, str, int, int]]] = {}
    for key, path in object_paths(metadata).items():
        entry = metadata.state_dict_metadata[key]
        inner = ".".join(str(p) for p in path[1:]) or key
        if isinstance(entry, TensorStorageMetadata):
            shape = "x".join(str(d) for d in entry.size) or "scalar"
            dtype = str(entry.properties.dtype).replace("torch.", "")
            out.setdefault(str(path[0]), []).append(
                (inner, f"{shape} {dtype}", entry.size.numel(), len(entry.chunks)))
        else:
            out.setdefault(str(path[0]), []).append((inner, "value", 0, 1))
    return out
