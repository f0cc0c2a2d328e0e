"""In-memory snapshots: the newest training state in node-local shared memory, every N steps.

``Checkpointer(root, ctx, snapshot_every=1)`` and ``ckpt.snapshot(step, **state)`` in the loop::

    /dev/shm/distrain-snapshots-<hash of root>/      (DISTRAIN_SNAPSHOT_DIR instead of /dev/shm)
      owner.json                                     the root it belongs to (stale ones are swept)
      rank-00001/slot-{0,1,2}.bin|.meta              this rank's ring of three slots

Each rank keeps its own state (objects, JSON values, its RNG) in a ring of preallocated slots.
A small state (up to :data:`INLINE_BYTES`) is copied and committed at once. Of a larger one,
``snapshot`` takes the parts that may change before the next optimizer step at once and copies
the tensors an optimizer owns (parameters and optimizer state) in a background thread while the
next forward and backward run; the optimizer's next ``step`` waits for that copy (a step
pre-hook), so the copy is of exactly this step's state. It runs after every step, so it does
nothing per step that it need not: no collective, no new buffers, no pickle.

Why three slots, not two: under DDP one rank can be a step ahead of another when a
rank dies, so the newest state every rank holds complete is the one before; with two slots the
rank ahead would already be overwriting it.

Files in ``/dev/shm`` outlive the process and the launcher's restart of the group (not a reboot).
They are removed when the script ends cleanly (``distrain.ddp.cleanup``), and a durable
checkpoint at the same step or later makes the older slots redundant (dropped at once).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import queue
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distrain.ckpt.convert import is_fsdp
from distrain.ckpt.rng_cache import RngCache
from distrain.ckpt.skeleton import decode, encode, encode_state
from distrain.ckpt.snapshot_files import Slot, SlotMeta, Spec, digest, layout, specs_of
from distrain.ckpt.state import restore_object, restore_rank_rng, state_of
from distrain.ckpt.store import CheckpointError
from distrain.errors import ConfigError
from distrain.wrapping import unwrap

if TYPE_CHECKING:
    from distrain.context import Context

SLOTS = 3
INLINE_BYTES = 1 << 20  # states up to this size are copied at once, without the copier thread
PREFIX = "distrain-snapshots-"
_MIB = 2**20


def base_dir() -> Path:
    return Path(os.environ.get("DISTRAIN_SNAPSHOT_DIR") or "/dev/shm")


def root_id(root: str | os.PathLike[str]) -> str:
    """The checkpoint root as a stable string: an absolute path, or the URL as given."""
    text = os.fspath(root)
    return text if "://" in text else os.path.abspath(text)


def run_dir(root: str | os.PathLike[str]) -> Path:
    """This node's snapshot directory for the checkpoint root ``root`` (one per run)."""
    digest = hashlib.sha256(root_id(root).encode()).hexdigest()[:16]
    return base_dir() / f"{PREFIX}{digest}"


def _identity(root: str) -> list[int] | None:
    """(device, inode) of a local root: a root deleted and made again is a different run."""
    if "://" in root:
        return None
    try:
        info = os.stat(root)
    except OSError:
        return None
    return [info.st_dev, info.st_ino]


def sweep(base: Path) -> list[Path]:
    """Remove snapshot directories whose local checkpoint root is gone or was made anew."""
    removed = []
    for path in base.glob(f"{PREFIX}*"):
        try:
            owner = json.loads((path / "owner.json").read_text())
        except (OSError, ValueError):
            continue  # being created, or not ours to judge
        root = str(owner.get("root", ""))
        if "://" not in root and _identity(root) != owner.get("identity"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove(root: str | os.PathLike[str]) -> None:
    """Remove every snapshot of ``root`` on this node (all ranks)."""
    shutil.rmtree(run_dir(root), ignore_errors=True)


class Snapshots:
    """This rank's ring of snapshot slots for one checkpoint root."""

    def __init__(self, root: str | os.PathLike[str], ctx: Context, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError("snapshot_every", every, "a positive integer (or None: no snapshots)",
                              "e.g. snapshot_every=1 for a snapshot after every step")
        self.every = every
        self.ctx = ctx
        self.root = root_id(root)
        self.dir = run_dir(root)
        self.rank_dir = self.dir / f"rank-{ctx.rank:05d}"
        self.slots = [Slot(self.rank_dir, i) for i in range(SLOTS)]
        self._steps: list[int | None] | None = None  # each slot's step (None: empty), once read
        # One long-lived copier thread (starting a thread per step costs more than a small copy)
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._hooked: set[int] = set()
        self._hooks: list[Any] = []
        self._checked = False
        self._taking = 0
        self._rng = RngCache()
        self._specs: tuple[Spec, ...] | None = None  # the layout of the last snapshot's tensors
        self._offsets: list[int] = []
        self._size = 0
        self._table: str | None = None  # the meta file's tensor table for self._specs
        self._plain: dict[int, Any] = {}  # objects checked not to be FSDP (kept: ids stay unique)
        if ctx.local_rank == 0 and base_dir().is_dir():
            sweep(base_dir())
        # Also a script that drops its Checkpointer and never calls cleanup ends clean: the
        # process's exit decides (not garbage collection, which also runs on a crash's way out).
        atexit.register(self.close)

    # -- taking -------------------------------------------------------------------------

    def take(self, step: int, objects: dict[str, Any], kinds: dict[str, str]) -> None:
        """Start the snapshot of ``step`` (returns once the state that may change is copied).

        Small states are copied, digested and committed here and now (handing them to a thread
        costs more than the copy); larger ones leave the optimizer's tensors to the copier."""
        self.wait()
        for obj in objects.values():
            if id(obj) not in self._plain:  # checked once per object (it walks the modules)
                if is_fsdp(obj):
                    raise ConfigError("snapshot of an FSDP model", "FSDP", "a DDP or plain model",
                                      "use durable checkpoints (ckpt.save) for FSDP runs for now")
                self._plain[id(obj)] = obj
        tensors: list[torch.Tensor] = []
        states = []
        for name, obj in objects.items():
            kind = kinds[name]
            if kind == "module":  # keep_vars: no detach per tensor; copied under no_grad
                state = unwrap(obj).state_dict(keep_vars=True)
            elif kind == "json":  # as a durable checkpoint keeps it (a JSON round trip)
                state = json.loads(json.dumps(obj))
            else:
                state = state_of(obj, kind)
            states += [name, encode_state(name, state, tensors)]
        skeleton = ["d", ["objects", ["d", states], "kinds", encode(kinds, tensors),
                          "rng", encode(self._rng.capture(), tensors)]]
        specs = specs_of(tensors)
        if specs != self._specs:
            self._specs, (self._offsets, self._size) = specs, layout(specs)
            self._table = None
        if not self._checked:
            self._check_room(self._size)
        slot = self._pick()
        slot.invalidate()
        data = slot.allocate(self._size)
        meta = SlotMeta(step=step, world_size=self.ctx.world_size, rank=self.ctx.rank, size=self._size,
                        digest=0, specs=specs, offsets=self._offsets, skeleton=skeleton)
        views = slot.views(meta, data)
        if self._size <= INLINE_BYTES:
            _copy(views, tensors)
            self._finish(slot, meta, data, [])
            self.wait()  # raises what _finish met
            return
        guarded = _optimizer_tensors(objects)
        later = []
        with torch.no_grad():
            for view, tensor in zip(views, tensors):
                if tensor.untyped_storage().data_ptr() in guarded:
                    later.append((view, tensor))
                else:  # may change before the next optimizer step (buffers, RNG): copy now
                    view.copy_(tensor)
        self._hook(objects)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name="distrain-snapshot", daemon=True)
            self._thread.start()
        self._idle.clear()
        self._jobs.put(functools.partial(self._finish, slot, meta, data, later))

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            finally:
                self._idle.set()

    def _pick(self) -> Slot:
        """The slot to overwrite: an empty one, else the one holding the oldest step."""
        if self._steps is None:
            self._steps = [m.step if m is not None else None for m in (s.read_meta() for s in self.slots)]
        steps = self._steps
        index = min(range(SLOTS), key=lambda i: (steps[i] is not None, steps[i] or 0))
        steps[index] = None
        self._taking = index
        return self.slots[index]

    def _finish(self, slot: Slot, meta: SlotMeta, data: torch.Tensor,
                later: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        try:
            if later:
                _copy([view for view, _ in later], [tensor for _, tensor in later])
            meta.digest = digest(data)
            if self._table is None:
                self._table = meta.table()
            slot.commit(meta, self._table)
            if self._steps is not None:
                self._steps[self._taking] = meta.step
        except BaseException as error:  # raised by wait(), in the training thread
            self._error = error

    def wait(self) -> None:
        """Finish the copy in flight; raise its error, if any."""
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise CheckpointError(f"snapshot in {self.rank_dir} failed: {error}") from error

    def _hook(self, objects: dict[str, Any]) -> None:
        for obj in objects.values():
            if isinstance(obj, torch.optim.Optimizer) and id(obj) not in self._hooked:
                self._hooked.add(id(obj))
                self._hooks.append(obj.register_step_pre_hook(_waiter(self)))

    def _check_room(self, size: int) -> None:
        """One clear error on every rank when this node's ranks' slots cannot fit."""
        self.rank_dir.mkdir(parents=True, exist_ok=True)
        owner = self.dir / "owner.json"
        if not owner.exists():
            temp = self.dir / f".owner.{os.getpid()}"
            temp.write_text(json.dumps({"root": self.root, "identity": _identity(self.root)}))
            os.replace(temp, owner)
        held = sum(s.data_path.stat().st_size for s in self.slots if s.data_path.exists())
        need = SLOTS * size * self.ctx.local_world_size
        free = shutil.disk_usage(self.dir).free + held * self.ctx.local_world_size
        short = torch.tensor([1.0 if need > free else 0.0])
        if self.ctx.distributed:
            dist.all_reduce(short, op=dist.ReduceOp.MAX)
        if short.item() > 0:
            remove(self.root)
            room = f"only {free / _MIB:.1f} MiB are" if need > free else "another node has less"
            raise CheckpointError(
                f"snapshots need {need / _MIB:.1f} MiB in {base_dir()} on a node ({SLOTS} slots x "
                f"{size / _MIB:.1f} MiB x {self.ctx.local_world_size} ranks) but {room}"
                " free; enlarge it (docker run --shm-size=..., or mount -o remount,size=... /dev/shm), "
                "set DISTRAIN_SNAPSHOT_DIR to a larger tmpfs, or take snapshots off (snapshot_every=None)")
        self._checked = True

    # -- finding and restoring -----------------------------------------------------------

    def complete(self) -> dict[int, Slot]:
        """This rank's complete slots by step (its own, or when it has none, the lowest rank's on
        this node: under DDP every rank holds the same state; its RNG is then derived)."""
        found = self._complete(self.slots)
        if found or self.rank_dir.exists():
            return found
        for other in sorted(self.dir.glob("rank-*")):
            found = self._complete([Slot(other, i) for i in range(SLOTS)])
            if found:
                return found
        return {}

    @staticmethod
    def _complete(slots: list[Slot]) -> dict[int, Slot]:
        found = {}
        for slot in slots:
            meta = slot.read_meta()
            if meta is not None:
                found[meta.step] = slot
        return found

    def agree(self) -> int | None:
        """The newest step whose snapshot every rank holds complete and verified, or None."""
        self.wait()
        mine = self.complete()
        excluded: set[int] = set()
        while True:
            steps = sorted(set(mine) - excluded)
            common = _intersect(self.ctx, steps)
            if not common:
                return None
            step = max(common)
            good = self._verify(mine[step], step)
            if _all(self.ctx, good):
                return step
            excluded.add(step)

    @staticmethod
    def _verify(slot: Slot, step: int) -> bool:
        meta = slot.read_meta()
        return meta is not None and meta.step == step and slot.verify(meta)

    def restore(self, step: int, objects: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
        """Put snapshot ``step`` into ``objects`` and this rank's RNG; returns the JSON values."""
        slot = self.complete()[step]
        meta = slot.read_meta()
        tensors = slot.read(meta) if meta is not None else None
        if meta is None or tensors is None:
            raise CheckpointError(f"snapshot step {step} in {slot.data_path.parent} changed while loading")
        try:
            state = decode(meta.skeleton, tensors)
        except (IndexError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"snapshot step {step} in {slot.data_path.parent} is damaged: {error}") \
                from error
        saved = state["objects"]
        missing = sorted(set(objects) - set(saved))
        if missing:
            raise CheckpointError(f"snapshot step {step} holds no {', '.join(missing)}; "
                                  f"it holds {', '.join(sorted(saved))}")
        for name, obj in objects.items():
            restore_object(name, obj, state["kinds"][name], saved[name])
        own = meta.rank == self.ctx.rank  # else borrowed (the world grew): a derived seed
        restore_rank_rng({"ranks": [state["rng"]]}, rank=0 if own else self.ctx.rank, step=step)
        return {name: saved[name] for name in objects if kinds[name] == "json"}

    # -- dropping -------------------------------------------------------------------------

    def drop(self, *, through: int | None = None, after: int | None = None) -> None:
        """Invalidate slots up to ``through`` (a durable checkpoint of that step exists) and
        after ``after`` (states of an abandoned timeline: resumed from an older step); all of
        them when neither is given."""
        self.wait()
        for slot in self.slots:
            meta = slot.read_meta()
            if meta is None:
                continue
            if (through is None and after is None) or (through is not None and meta.step <= through) \
                    or (after is not None and meta.step > after):
                slot.invalidate()
        self._steps = None

    def close(self) -> None:
        """At cleanup and exit: wait; when the script ends cleanly, remove this rank's snapshots."""
        try:
            self.wait()
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()
            if sys.exc_info()[0] is None and not hasattr(sys, "last_value"):
                shutil.rmtree(self.rank_dir, ignore_errors=True)
                if self.ctx.local_rank == 0:  # ranks of a larger world that ran here before
                    for other in self.dir.glob("rank-*"):
                        if int(other.name.split("-")[1]) >= self.ctx.world_size:
                            shutil.rmtree(other, ignore_errors=True)
                if not any(self.dir.glob("rank-*")):
                    shutil.rmtree(self.dir, ignore_errors=True)


def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` for all i, in one call where torch has one."""
    with torch.no_grad():
        try:  # one call; not checked per tensor first: it runs after every step
            torch._foreach_copy_(targets, sources)
        except RuntimeError:  # e.g. tensors on several devices: one by one (a copy is idempotent)
            for target, source in zip(targets, sources):
                target.copy_(source)


def _optimizer_tensors(objects: dict[str, Any]) -> set[int]:
    """Storages an optimizer step writes: its parameters and its state tensors."""
    found: set[int] = set()
    for obj in objects.values():
        if isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                found.update(p.untyped_storage().data_ptr() for p in group["params"])
            for values in obj.state.values():
                found.update(v.untyped_storage().data_ptr() for v in values.values()
                             if isinstance(v, torch.Tensor))
    return found


def _waiter(snapshots: Snapshots) -> Callable[..., None]:
    import weakref

    ref = weakref.ref(snapshots)

    def wait_for_copy(*_: Any) -> None:
        target = ref()
        if target is not None:
            target.wait()

    return wait_for_copy


def _intersect(ctx: Context, steps: list[int]) -> set[int]:
    if not ctx.distributed:
        return set(steps)
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, steps)
    return set.intersection(*(set(s) for s in gathered))


def _all(ctx: Context, ok: bool) -> bool:
    if not ctx.distributed:
        return ok
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, ok)
    return all(gathered)
