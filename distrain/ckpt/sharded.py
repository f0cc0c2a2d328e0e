"""Sharded checkpoints: every rank writes its own shard through ``torch.distributed.checkpoint``.

Used by :class:`~distrain.ckpt.Checkpointer` when a saved model is FSDP-wrapped (or
``sharded=True``). A checkpoint directory then holds::

    step-00001200/
      manifest.json       # kind "sharded", world size, digest + size of every file below
      .metadata           # DCP's index: global shape of every tensor, which shard holds which piece
      __0_0.distcp ...    # one file per rank: that rank's shards of model and optimizer
      rng.pt extra.json   # every rank's RNG state; JSON values
      scheduler.pt ...    # small unsharded objects (scheduler, scaler, loader), from rank 0

Models and optimizers go through ``get_state_dict``/``set_state_dict`` and DCP, so a checkpoint
written on W ranks loads on any other number (DCP reads the pieces each new shard overlaps).
The guarantees are those of the full checkpoints, from the same code (:mod:`distrain.ckpt.store`
and the write job of ``CheckpointWriter.prepare``): all ranks write into rank 0's temporary
directory, agree that every shard is on disk, then rank 0 hashes every file into the
manifest and publishes the directory by one atomic rename. ``async_save=True`` uses
``dcp.async_save`` on a process group of its own: ``save`` returns once the state is copied
to CPU memory; rank 0 commits when the write has finished (joined by ``wait()``, the next
``save`` and ``distrain.cleanup()``, which holds the saver until then).
Loading runs no pickled code: see :mod:`distrain.ckpt.dcp_io`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch.distributed as dist

from distrain.ckpt.convert import Pairing, original_class, pair
from distrain.ckpt.dcp_names import METADATA_FILE, STORAGE
from distrain.ckpt.objstore import ObjectStaging, ObjectStore
from distrain.ckpt.remote import ObjectPath
from distrain.ckpt.store import CheckpointError, CheckpointStore, Staging
from distrain.collectives import broadcast, first_failure

if TYPE_CHECKING:
    from distrain.ckpt.writer import CheckpointWriter
    from distrain.context import Context

# torch.distributed.checkpoint is imported on first use: a DDP-only program need not pay for it.


def dcp_states(pairing: Pairing, names: set[str] | None = None) -> dict[str, Any]:
    """The models' and optimizers' state dicts as DCP reads and writes them (sharded under
    FSDP, whole otherwise), keyed by object name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    keep = pairing.names if names is None else names
    out: dict[str, Any] = {n: get_model_state_dict(m) for n, m in pairing.modules.items() if n in keep}
    for name, (model, optimizer) in pairing.optimizers.items():
        if name in keep:
            out[name] = get_optimizer_state_dict(pairing.modules[model], optimizer)
    return out


class ShardedSaver:
    """The sharded half of a Checkpointer: its asynchronous save in flight and its own group."""

    def __init__(self) -> None:
        self._pending: Future[Any] | None = None  # this rank's dcp.async_save
        self._group: dist.ProcessGroup | None = None

    def wait(self) -> None:
        """Finish this rank's asynchronous write, if any; raise its error as a CheckpointError."""
        future, self._pending = self._pending, None
        if future is not None:
            _result(future)

    def save(self, ckpt: CheckpointWriter, step: int, objects: dict[str, Any], kinds: dict[str, str]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

        from distrain.ckpt.dcp_io import dcp_failure, single_process_quietly

        ctx = ckpt.ctx
        pairing = pair(objects, kinds)  # the same on every rank: a ConfigError is raised by all
        rest = {name: obj for name, obj in objects.items() if name not in pairing.names}
        error: BaseException | None = None
        for finish in (self.wait, ckpt.finish_write) if ctx.is_main else (self.wait,):
            try:  # the previous save: this rank's write, and on rank 0 its commit
                finish()
            except CheckpointError as failed:
                error = error or failed
        staging: Staging | ObjectStaging | None = None
        if ctx.is_main and error is None:
            try:
                staging = ckpt.store.stage(step)
            except OSError as failed:
                error = ckpt.write_error(step, failed)
        where: Any = broadcast(None if staging is None else str(staging.path))
        agree(error, step, staging)
        rngs = ckpt.gather_rng()
        job = None
        if ctx.is_main:
            records = {name: {"type": kinds[name], "file": METADATA_FILE, "storage": STORAGE,
                              "class": original_class(objects[name])} for name in sorted(pairing.names)}
            try:
                job = ckpt.prepare(step, rest, kinds, rngs, checkpoint_kind="sharded",
                                    elsewhere=records)
            except Exception as failed:
                error = failed
        agree(error, step, staging)
        state = dcp_states(pairing)
        writer = _writer(ckpt.store, where)
        if ckpt.async_save:  # the CPU copy happens in async_save; the write on DCP's thread
            with single_process_quietly():
                started = dcp.async_save(state, storage_writer=writer, process_group=self._async_group(ctx),
                                         no_dist=not ctx.distributed)
            future = started.upload_completion if isinstance(started, AsyncSaveResponse) else started
            self._pending = future
            if job is not None:
                ckpt.submit_write(functools.partial(job, staging=staging,
                                                      before=functools.partial(_collect, future)))
            return
        try:
            with single_process_quietly():
                dcp.save(state, storage_writer=writer, no_dist=not ctx.distributed)
        except CheckpointException as failed:
            error = dcp_failure(failed, f"could not write checkpoint step {step}")
        agree(error, step, staging)  # the barrier: every shard is on disk
        if job is not None:
            try:
                job(staging=staging, before=functools.partial(_collect, None))
            except Exception as failed:
                error = failed
        agree(error, step, None)  # no rank runs ahead of the commit

    def _async_group(self, ctx: Context) -> dist.ProcessGroup | None:
        """A gloo group for the background write: its collectives must not interleave with the
        training's on the default group (and async_save needs a CPU backend under nccl)."""
        if not ctx.distributed:
            return None
        if self._group is None:
            self._group = cast(dist.ProcessGroup, dist.new_group(backend="gloo"))
        return self._group


def _result(future: Future[Any]) -> Any:
    from torch.distributed.checkpoint.api import CheckpointException

    from distrain.ckpt.dcp_io import dcp_failure

    try:
        return future.result()
    except CheckpointException as failed:
        raise dcp_failure(failed, "background sharded checkpoint write failed") from None


def _writer(store: CheckpointStore | ObjectStore, where: str) -> Any:
    """DCP's writer into staging directory ``where``: a file per rank on disk, or an object
    per rank in the store (:mod:`distrain.ckpt.dcp_remote`)."""
    from torch.distributed.checkpoint import FileSystemWriter

    if isinstance(store, ObjectStore):
        from distrain.ckpt.dcp_remote import ObjectWriter

        return ObjectWriter(where, store.remote)
    return FileSystemWriter(where)


def _collect(future: Future[Any] | None, staging: Staging | ObjectStaging) -> None:
    """Once DCP has finished: record every file the ranks wrote into the staging directory."""
    if future is not None:
        _result(future)
    if isinstance(staging, ObjectStaging):
        staging.add_written()
        if METADATA_FILE not in staging.files:
            raise CheckpointError(f"{staging.path}: DCP wrote no {METADATA_FILE}")
        return
    for entry in sorted(staging.path.iterdir()):
        if entry.is_file() and entry.name not in staging.files:
            staging.add_existing(entry.name)
    if METADATA_FILE not in staging.files:
        raise CheckpointError(f"{staging.path}: DCP wrote no {METADATA_FILE}")


def agree(error: BaseException | None, step: int,
          staging: Staging | ObjectStaging | None) -> None:
    """Every rank learns whether any rank failed saving ``step`` (a collective: every rank
    calls it); the failing rank raises its own error, the others a CheckpointError naming it."""
    failed = first_failure(None if error is None else f"{error}")
    if failed is None:
        return
    if staging is not None:
        staging.abort()
    if error is not None:
        raise error
    rank, text = failed
    raise CheckpointError(f"rank {rank} could not save checkpoint step {step}: {text}")


def load(ctx: Context, path: Path | ObjectPath, manifest: Mapping[str, Any], objects: Mapping[str, Any],
         kinds: Mapping[str, str], names: set[str]) -> None:
    """Read objects ``names`` (models, optimizers) from the DCP shards of ``path`` into place,
    resharded to this run's world. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from distrain.ckpt.dcp_io import dcp_load, read_metadata, shard_names

    pairing = pair(objects, kinds)  # an optimizer passed without its model: a ConfigError
    metadata = read_metadata(path, shard_names(manifest))
    state = dcp_states(pairing, names)
    dcp_load(state, path, metadata, no_dist=not ctx.distributed)
    for name in sorted(names & set(pairing.modules)):
        set_model_state_dict(pairing.modules[name], state[name])
    for name in sorted(names & set(pairing.optimizers)):
        model, optimizer = pairing.optimizers[name]
        set_optimizer_state_dict(pairing.modules[model], optimizer, state[name])
