"""``Checkpointer``: rank 0 writes the full state, every rank restores it, resume is exact.

::

    ckpt = Checkpointer("runs/x/ckpt", ctx, keep_last=3)
    step = ckpt.load_latest(model=model, optimizer=opt, loader=loader) or 0  # None: fresh start
    for batch in loader:
        ...
        step += 1
        if step % 500 == 0:
            ckpt.save(step, model=model, optimizer=opt, loader=loader, extra={"loss": loss})

``save`` and ``load_latest`` are called on **every** rank (each rank contributes its RNG state
and learns whether rank 0 succeeded). ``state_dict()`` of the objects is called on rank 0 only:
under DDP every rank holds the same model and optimizer. Every rank reads the checkpoint files
itself. ``root`` may be a directory or an fsspec URL (``s3://bucket/run``, see
:mod:`distrain.ckpt.objstore`): with a URL, ranks on any node read what they need from the
store, and nodes share nothing but the URL.

With an FSDP-wrapped model (or ``sharded=True``) every rank writes its own shard instead, through
``torch.distributed.checkpoint`` (:mod:`distrain.ckpt.sharded`); ``load_latest`` reads either
kind into either kind of run (sharded into DDP, full into FSDP, on any world size).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import socket
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distrain.ckpt.background import BackgroundWriter
from distrain.ckpt.convert import gather_full, is_fsdp, original_class, restore_full
from distrain.ckpt.dcp_names import STORAGE
from distrain.ckpt.objstore import ObjectStaging, ObjectStore, open_store
from distrain.ckpt.remote import ObjectPath
from distrain.ckpt.sharded import ShardedSaver, agree
from distrain.ckpt.sharded import load as load_sharded
from distrain.ckpt.snapshot import Snapshots
from distrain.ckpt.state import (
    JSON_FILE,
    RNG_FILE,
    capture_rng,
    class_name,
    kind_of,
    module_mismatch,
    restore_object,
    restore_rank_rng,
    safe_load,
    snapshot,
    state_of,
)
from distrain.ckpt.store import (
    CheckpointError,
    CheckpointPath,
    Staging,
    check_retention,
    json_writer,
    read_manifest,
    verify,
)
from distrain.ckpt.tensorfile import save_state
from distrain.collectives import broadcast, first_failure
from distrain.errors import ConfigError
from distrain.group import InFlight, hold_until_cleanup, on_cleanup, resolve
from distrain.version import __version__

if TYPE_CHECKING:
    from distrain.context import Context


class Checkpointer:
    """Atomic, verified, optionally asynchronous checkpoints under ``root``.

    Args:
        root: A directory, or a URL (``s3://bucket/prefix``) read and written through fsspec.
        ctx: The worker's context; the current one by default.
        keep_last: How many of the newest checkpoints to keep (None: all).
        keep_every: Also keep every checkpoint whose step is a multiple of it.
        async_save: ``save`` only copies the state to CPU memory and returns; a background
            thread writes it (one save in flight at most; ``wait()``, the next ``save`` and
            ``distrain.cleanup()`` join it and raise its error on every rank, cleanup also when
            this Checkpointer was dropped before it).
        sharded: Write sharded checkpoints (every rank its shard, through DCP); None: sharded
            when a saved model is FSDP-wrapped, full (rank 0 writes) otherwise.
        storage_options: Passed to fsspec when ``root`` is a URL (credentials, ``endpoint_url``);
            by default S3 reads the ``AWS_*`` environment variables.
        snapshot_every: ``snapshot(step, ...)`` keeps the state of every N-th step in node-local
            shared memory, and ``load_latest`` resumes from it when it is newer than the newest
            checkpoint (:mod:`distrain.ckpt.snapshot`).

    Raises:
        ConfigError: A retention, ``sharded`` or ``snapshot_every`` value that is not valid.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        ctx: Context | None = None,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        async_save: bool = False,
        sharded: bool | None = None,
        storage_options: Mapping[str, Any] | None = None,
        snapshot_every: int | None = None,
    ) -> None:
        check_retention(keep_last, keep_every)
        if sharded is not None and not isinstance(sharded, bool):
            raise ConfigError("sharded", sharded, "True, False or None (sharded when the model is FSDP)",
                              "e.g. sharded=None")
        self.sharded = sharded
        self._sharded = ShardedSaver()
        self.store = open_store(root, storage_options)
        self.ctx = ctx = resolve(ctx)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = bool(async_save)
        self.values: dict[str, Any] = {}  # the JSON values of the checkpoint last loaded
        self.path: CheckpointPath | None = None  # the checkpoint last loaded (or saved, sync)
        self._writer = BackgroundWriter()
        # The step of the async save in flight, on every rank (rank 0 alone runs a full one's
        # write): wait() then agrees on its outcome, so its error reaches every rank.
        self._in_flight: int | None = None
        # The same save held by distrain.cleanup(), which finishes and agrees on it even if this
        # Checkpointer is gone by then (the hold does not keep it alive).
        self._held: InFlight | None = None
        # Async: the CPU copies of the last save, reused by the next one once its write is done
        # (save() waits for it first), so the pause is a copy into warm pages.
        self._staging: dict[str, torch.Tensor] = {}
        if ctx.is_main:
            self.store.create()
            self.store.remove_stale()
        self._snapshots = None if snapshot_every is None else Snapshots(root, ctx, snapshot_every)
        if self._snapshots is not None:
            on_cleanup(self._snapshots.close)

    @property
    def root(self) -> CheckpointPath:
        """Where the checkpoints live (a directory, or an object-store path)."""
        return self.store.root

    # -- saving --------------------------------------------------------------------------

    def save(self, step: int, **objects: Any) -> None:
        """Write checkpoint ``step`` holding ``objects`` (call on every rank).

        Nothing half-written is ever published: the checkpoint appears whole, by one atomic
        rename (or commit, in an object store), or not at all.

        Args:
            step: The global step count (a non-negative integer; the directory's name).
            **objects: Name -> what to save: modules (wrapped or not), optimizers, LR
                schedulers, GradScalers, resumable loaders, anything with ``state_dict``, or
                JSON-able values.

        Raises:
            CheckpointError: On every rank, if a rank could not write it (or, in async mode,
                the previous one); the objects in memory are untouched, so training can go on
                or save elsewhere.
            ConfigError: A bad step, or no objects.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError("step", step, "a non-negative integer", "pass the global step count")
        if not objects:
            raise ConfigError("objects", "none", "at least one object to save",
                              "e.g. ckpt.save(step, model=model, optimizer=optimizer)")
        kinds = {name: kind_of(name, obj) for name, obj in objects.items()}
        fsdp = any(is_fsdp(obj) for obj in objects.values())
        self._settled()  # the save in flight is joined below and its outcome agreed
        if self.sharded or (self.sharded is None and fsdp):
            self._sharded.save(self, step, objects, kinds)
            if self.async_save:
                self._hold(step)
            return
        error: BaseException | None = None
        if self.ctx.is_main:
            try:
                self._writer.wait()
            except CheckpointError as failed:
                error = failed
        gathered = gather_full(objects, kinds) if fsdp else {}  # a collective: every rank
        rngs = self.gather_rng()
        job: Callable[[], None] | None = None
        if self.ctx.is_main and error is None:
            try:
                job = self.prepare(step, objects, kinds, rngs, gathered=gathered)
            except Exception as failed:
                error = failed
        self._raise_everywhere(error, step)
        if self.async_save:
            if job is not None:
                self._writer.submit(job)
            self._hold(step)
            return
        if job is not None:
            try:
                job()
            except Exception as failed:
                error = failed
        self._raise_everywhere(error, step)  # also the barrier: no rank runs ahead of the write
        if self._snapshots is not None:
            self._snapshots.drop(through=step)  # the checkpoint makes them redundant

    def snapshot(self, step: int, **objects: Any) -> bool:
        """Keep the state in memory if ``step`` is a multiple of ``snapshot_every``.

        Call it on every rank after every optimizer step.

        Args:
            step: The global step count.
            **objects: As for :meth:`save`.

        Returns:
            True when a snapshot was started.

        Raises:
            ConfigError: The Checkpointer has no ``snapshot_every``, or a bad step.
        """
        if self._snapshots is None:
            raise ConfigError("snapshot_every", None, "a positive integer to take snapshots",
                              "e.g. Checkpointer(root, ctx, snapshot_every=1)")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError("step", step, "a non-negative integer", "pass the global step count")
        if step % self._snapshots.every:
            return False
        self._snapshots.take(step, objects, {name: kind_of(name, obj) for name, obj in objects.items()})
        return True

    def wait(self) -> None:
        """Finish the background write in flight; if it failed, raise on every rank.

        Call it on every rank, as ``save``.

        Raises:
            CheckpointError: The write in flight failed on some rank (nothing of it was published).
        """
        if self._snapshots is not None:
            self._snapshots.wait()
        step = self._in_flight
        self._settled()
        error: CheckpointError | None = None
        try:
            _finish(self._sharded, self._writer if self.ctx.is_main else None)
        except CheckpointError as failed:
            error = failed
        if step is not None:
            agree(error, step, None)
        elif error is not None:
            raise error

    def _hold(self, step: int) -> None:
        """Record the async save of ``step`` in flight, here and with distrain.cleanup()."""
        self._in_flight = step
        # The write job and DCP's future keep what they need alive; the hold needs only these.
        self._held = hold_until_cleanup(functools.partial(
            _finish, self._sharded, self._writer if self.ctx.is_main else None))

    def _settled(self) -> None:
        """The save in flight is being joined and agreed on here: cleanup need not."""
        held, self._held, self._in_flight = self._held, None, None
        if held is not None:
            held.release()

    def prepare(
        self, step: int, objects: dict[str, Any], kinds: dict[str, str], rngs: list[Any], *,
        checkpoint_kind: str = "full", gathered: dict[str, Any] | None = None,
        elsewhere: dict[str, dict[str, str]] | None = None,
    ) -> Callable[..., None]:
        """Take the state now (CPU copies when async: the only stall); return the write job.

        Part of the :class:`~distrain.ckpt.writer.CheckpointWriter` interface (rank 0 only).

        Args:
            step: The checkpoint's step.
            objects: Name -> object to write.
            kinds: Name -> its kind (``kind_of``).
            rngs: Every rank's RNG state (:meth:`gather_rng`).
            checkpoint_kind: ``"full"`` or ``"sharded"`` (recorded in the manifest).
            gathered: States already collected (FSDP gathered in full).
            elsewhere: Manifest records of objects the job does not write (the sharded path's
                DCP files).

        Returns:
            The job: ``job(staging=None, before=None)`` writes, commits, points ``latest`` at
            the checkpoint and applies retention.
        """
        states: dict[str, Any] = {}
        values: dict[str, Any] = {}
        described: dict[str, dict[str, str]] = {}
        for name, obj in objects.items():
            kind = kinds[name]
            if kind == "json":  # a round trip freezes it: later changes must not leak in
                values[name] = json.loads(json.dumps(obj))
                described[name] = {"type": kind, "file": JSON_FILE, "class": class_name(obj)}
            else:
                fresh = gathered is not None and name in gathered  # gathered: a private copy
                state = gathered[name] if gathered is not None and fresh else state_of(obj, kind)
                states[name] = snapshot(state, copy=self.async_save and not fresh, where=name,
                                        staging=self._staging)
                described[name] = {"type": kind, "file": f"{name}.pt", "class": original_class(obj)}
        described.update(elsewhere or {})
        rng = {"world_size": self.ctx.world_size, "ranks": rngs}
        now = datetime.datetime.now(datetime.timezone.utc)
        meta = {
            "kind": checkpoint_kind,
            "world_size": self.ctx.world_size,
            "time": now.isoformat(timespec="seconds"),
            "hostname": socket.gethostname(),
            "torch": torch.__version__,
            "distrain": __version__,
            "python": platform.python_version(),
            "objects": described,
        }
        return functools.partial(self._write, step, states, values, rng, meta)

    def _write(self, step: int, states: dict[str, Any], values: dict[str, Any],
               rng: dict[str, Any], meta: dict[str, Any], *,
               staging: Staging | ObjectStaging | None = None,
               before: Callable[[Any], None] | None = None) -> None:
        """Write the files, commit, point ``latest`` at it, apply retention. The sharded path
        passes the ``staging`` its ranks wrote into and ``before``, which records their files."""
        if staging is None:
            try:
                staging = self.store.stage(step)
            except OSError as error:
                raise self.write_error(step, error) from error
        try:
            if before is not None:
                before(staging)
            writers = {f"{name}.pt": functools.partial(save_state, state)
                       for name, state in states.items()}
            # All side by side: a checkpoint's small files add no round trip of their own.
            staging.write_files({**writers, RNG_FILE: functools.partial(save_state, rng),
                                 JSON_FILE: json_writer(values)})
            path = staging.commit(meta)
        except OSError as error:
            staging.abort()
            raise self.write_error(step, error) from error
        except BaseException:
            staging.abort()
            raise
        try:
            self.store.set_latest(path)  # type: ignore[arg-type]  # the store's own kind of path
            if self.keep_last is not None:  # else every checkpoint is kept: nothing to list
                self.store.apply_retention(keep_last=self.keep_last, keep_every=self.keep_every,
                                           protect={step})
        except OSError as error:  # committed: load_latest finds it by its manifest
            raise CheckpointError(
                f"checkpoint step {step} was committed to {path}, but updating {error.filename} "
                f"afterwards failed: {error.strerror or error}; the checkpoint is loadable") from error
        if not self.async_save:
            self.path = path

    def write_error(self, step: int, error: OSError) -> CheckpointError:
        """The one-line error for a failed write of ``step``: what was kept, how to fix it.

        Args:
            step: The checkpoint that could not be written.
            error: The OS error of the write.

        Returns:
            The error to raise.
        """
        where = error.filename or self.root
        try:
            newest = [p.name for _, p in self.store.checkpoints()[-1:]]
            kept = f"{newest[0]} is still the newest checkpoint" if newest else "no checkpoint was lost"
        except OSError:  # the store is unreachable: what it holds was not touched either
            kept = "the checkpoints already committed are untouched"
        fix = ("check that the store is reachable (endpoint, credentials, bucket)"
               if isinstance(self.store, ObjectStore) else "free disk space or pick a writable root")
        return CheckpointError(
            f"could not write checkpoint step {step} to {where}: {error.strerror or error}; "
            f"nothing was published ({kept}) and the training state in memory is unchanged; "
            f"{fix}, then save again")

    def gather_rng(self) -> list[Any]:
        """Every rank's RNG state, gathered on rank 0 (a collective: call it on every rank).

        Returns:
            The states in rank order on rank 0; an empty list on the other ranks.
        """
        state = capture_rng()
        if not self.ctx.distributed:
            return [state]
        gathered: list[Any] | None = [None] * self.ctx.world_size if self.ctx.is_main else None
        dist.gather_object(state, gathered, dst=0)
        return gathered or []

    def finish_write(self) -> None:
        """Wait for rank 0's background write job, raising its error (:class:`CheckpointWriter`)."""
        self._writer.wait()

    def submit_write(self, job: Callable[[], None]) -> None:
        """Run ``job`` on rank 0's background writer (:class:`CheckpointWriter`)."""
        self._writer.submit(job)

    def _raise_everywhere(self, error: BaseException | None, step: int) -> None:
        """Any rank's error (only rank 0 writes), raised on every rank; it raises the original."""
        failed = first_failure(None if error is None else str(error))
        if error is not None:
            raise error
        if failed is not None:
            rank, message = failed
            raise CheckpointError(f"rank {rank} could not save checkpoint step {step}: {message}")

    # -- loading -------------------------------------------------------------------------

    def load_latest(self, **objects: Any) -> int | None:
        """Restore ``objects`` and this rank's RNG from the newest valid checkpoint.

        Checkpoints that fail verification are skipped with a :class:`CheckpointWarning` naming
        them. JSON values are in :attr:`values` afterwards (and copied into any dict passed under
        their name). Call it on every rank.

        Args:
            **objects: Name -> object to restore in place, as passed to :meth:`save`.

        Returns:
            The step of the checkpoint restored, or None when there is none (nothing is
            changed then).

        Raises:
            CheckpointError: A checkpoint was chosen but could not be read.
            ConfigError: A JSON value's name is given something other than a dict.
        """
        kinds = {name: kind_of(name, obj) for name, obj in objects.items()}
        for name, obj in objects.items():
            if kinds[name] == "json" and not isinstance(obj, MutableMapping):
                raise ConfigError(f"checkpoint object {name}", type(obj).__name__,
                                  "a dict to receive the saved JSON value",
                                  f"pass {name}={{}} or read .values[{name!r}] after loading")
        self.wait()
        exact = any(is_fsdp(obj) for obj in objects.values())  # shards: own rank, same world size
        in_memory = self._snapshots.agree(exact=exact) if self._snapshots is not None else None
        choice: str | None = None
        error: str | None = None
        if self.ctx.is_main:
            try:
                found = self.store.newest_valid()
                choice = str(found.path) if found is not None else None
                durable = int((found.manifest or {})["step"]) if found is not None else -1
                if in_memory is not None and in_memory >= durable:
                    choice = ""  # the snapshot: as new or newer, and read from memory
            except OSError as failed:
                error = f"cannot read checkpoints under {self.root}: {failed}"
        choice, error = broadcast((choice, error))
        if error is not None:
            raise CheckpointError(error)
        if choice == "" and self._snapshots is not None and in_memory is not None:
            self.values = self._snapshots.restore(in_memory, objects, kinds)
            self.path = None
            self._snapshots.drop(after=in_memory)
            return in_memory
        step = None
        if choice is not None:
            store = self.store
            path = ObjectPath(store.remote, choice) if isinstance(store, ObjectStore) else Path(choice)
            step = self._load(path, objects, kinds)
        if self._snapshots is not None:  # older, or of a timeline given up: none is needed now
            self._snapshots.drop()
        return step

    def _load(self, path: CheckpointPath, objects: dict[str, Any], kinds: dict[str, str]) -> int:
        manifest = read_manifest(path)
        if not self.ctx.is_main:  # rank 0 checked every hash; the others check sizes
            checked = verify(path, hashes=False)
            if not checked.ok:
                raise CheckpointError(f"checkpoint {path}: {'; '.join(checked.problems)}")
        if manifest.get("kind") not in ("full", "sharded"):
            raise CheckpointError(
                f"checkpoint {path} is a {manifest.get('kind')!r} checkpoint; this distrain reads "
                "'full' and 'sharded' ones (upgrade distrain)")
        saved: dict[str, dict[str, str]] = manifest["objects"]
        missing = sorted(set(objects) - set(saved))
        if missing:
            raise CheckpointError(
                f"checkpoint {path} holds no {', '.join(missing)}; it holds {', '.join(sorted(saved))}")
        values: dict[str, Any] = json.loads((path / JSON_FILE).read_text())
        states: dict[str, Any] = {}
        in_shards = {name for name in objects if saved[name].get("storage") == STORAGE}
        for name in objects:  # load every file before changing anything
            saved_kind = saved[name]["type"]
            if (saved_kind == "json") != (kinds[name] == "json"):
                raise CheckpointError(
                    f"checkpoint {path}: {name} was saved as {saved_kind}, cannot restore it "
                    f"into a {type(objects[name]).__name__}")
            if name not in in_shards:
                states[name] = (values[name] if saved_kind == "json" else
                                safe_load(path / saved[name]["file"], map_location=self.ctx.device))
        for name, state in states.items():  # another model's checkpoint: one line, nothing changed
            mismatch = (module_mismatch(objects[name], state)
                        if kinds[name] == "module" and not is_fsdp(objects[name]) else None)
            if mismatch:
                raise CheckpointError(f"checkpoint {path}: its {name} does not fit this model ({mismatch}); "
                                      "is it another model's checkpoint directory?")
        rng = safe_load(path / RNG_FILE, map_location="cpu")
        if in_shards:  # models and optimizers of a sharded checkpoint: read through DCP
            load_sharded(self.ctx, path, manifest, objects, kinds, in_shards)
        done = in_shards
        if any(is_fsdp(obj) for obj in objects.values()):  # full states into sharded models
            done = done | restore_full(objects, kinds, states)
        for name, obj in objects.items():
            if name not in done:
                restore_object(name, obj, saved[name]["type"], states[name])
        step = int(manifest["step"])
        restore_rank_rng(rng, rank=self.ctx.rank, step=step)
        self.values = values
        self.path = path
        return step


def _finish(sharded: ShardedSaver, writer: BackgroundWriter | None) -> None:
    """Join this rank's part of an async save: its DCP write, and rank 0's write and commit."""
    try:
        sharded.wait()
    finally:
        if writer is not None:
            writer.wait()
