"""In-memory snapshots: the newest training state in node-local shared memory, every N steps.

``Checkpointer(root, ctx, snapshot_every=1)`` and ``ckpt.snapshot(step, **state)`` in the loop::

    /dev/shm/distrain-snapshots-<hash of root>/      (DISTRAIN_SNAPSHOT_DIR instead of /dev/shm)
      owner.json                                     the root it belongs to (stale ones are swept)
      rank-00001/slot-{0,1,2}.bin|.meta              this rank's ring of three slots
      held-00003/slot-{0,1,2}.bin|.meta              copies of rank 3's (its buddy is here)

Each rank keeps its own state (objects, JSON values, its RNG) in a ring of preallocated slots;
under FSDP its own shards of the model and optimizer (:mod:`distrain.ckpt.snapshot_shards`).
With more than one node each snapshot is also sent to the rank's buddy on the next node
(:mod:`distrain.ckpt.buddy`), and ``load_latest`` takes a rank's state from wherever it is
(:mod:`distrain.ckpt.snapshot_plan`).
A small state (up to :data:`INLINE_BYTES`) is copied and committed at once. Of a larger one,
``snapshot`` takes the parts that may change before the next optimizer step at once and copies
the tensors an optimizer owns (parameters and optimizer state) in a background thread while the
next forward and backward run; the optimizer's next ``step`` waits for that copy (a step
pre-hook), so the copy is of exactly this step's state. It runs after every step, so it does
nothing per step that it need not: no collective on the training's group, no new buffers, no
pickle.

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
import json
import os
import queue
import shutil
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distrain.affinity import unpin_this_thread
from distrain.ckpt.buddy import HELD, BuddyLink, fetch
from distrain.ckpt.convert import Pairing, is_fsdp, pair
from distrain.ckpt.rng_cache import RngCache
from distrain.ckpt.skeleton import JsonMemo, decode, encode, encode_state
from distrain.ckpt.snapshot_dirs import base_dir, identity, remove, root_id, run_dir, sweep
from distrain.ckpt.snapshot_files import Slot, SlotMeta, Spec, digest, layout, specs_of, verified_copies
from distrain.ckpt.snapshot_plan import Held, Source, choose
from distrain.ckpt.snapshot_shards import local_states, local_tensor, restore_local
from distrain.ckpt.state import restore_object, restore_rank_rng, state_of
from distrain.ckpt.store import CheckpointError
from distrain.errors import ConfigError
from distrain.wrapping import unwrap

if TYPE_CHECKING:
    from distrain.context import Context

SLOTS = 3
INLINE_BYTES = 1 << 20  # states up to this size are copied at once, without the copier thread
_MIB = 2**20


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
        self._json = JsonMemo()
        self._shards: tuple[Any, list[Any], Pairing | None, set[str]] = ((), [], None, set())
        self._plan: tuple[int, list[Source]] | None = None  # what agree() chose, for restore()
        self.buddy = BuddyLink(ctx, self.dir, SLOTS)
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
        sharded = self._sharded_names(objects, kinds)
        tensors: list[torch.Tensor] = []
        states = []
        shards = local_states(self._pairing(objects, kinds), sharded) if sharded else {}
        for name, obj in objects.items():
            kind = kinds[name]
            if name in shards:  # this rank's shards of an FSDP model or of its optimizer
                state = shards[name]
            elif kind == "module":  # keep_vars: no detach per tensor; copied under no_grad
                state = unwrap(obj).state_dict(keep_vars=True)
            elif kind == "json":  # as a durable checkpoint keeps it (a JSON round trip)
                state = json.loads(json.dumps(obj))
            else:
                state = state_of(obj, kind)
            states += [name, encode_state(name, state, tensors)]
        encoded_kinds, rng = encode(kinds, tensors), encode(self._rng.capture(), tensors)
        text = _skeleton_json(self._json, states, encoded_kinds, rng)
        specs = specs_of(tensors)
        if specs != self._specs:
            self._specs, (self._offsets, self._size) = specs, layout(specs)
            self._table = None
        if not self._checked:
            self._check_room(self._size)
            self.buddy.start()
        slot = self._pick()
        slot.invalidate()
        data = slot.allocate(self._size)
        meta = SlotMeta(step=step, world_size=self.ctx.world_size, rank=self.ctx.rank, size=self._size,
                        digest=0, specs=specs, offsets=self._offsets, skeleton=None, skeleton_json=text)
        views = slot.views(meta, data)
        if self._size <= INLINE_BYTES:
            _copy(views, tensors)
            self._finish(slot, meta, data, [])
            self.wait()  # raises what _finish met
            return
        guarded = _optimizer_tensors(objects, local_tensor if sharded else None)
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
        unpin_this_thread()  # any core of the node, not only this rank's (distrain.affinity)
        while True:
            job = self._jobs.get()
            try:
                job()
            finally:
                self._idle.set()

    def _pick(self) -> Slot:
        """The slot to overwrite: an empty one, else the one holding the oldest step that is not
        one of the newest two whose buddy copies went everywhere."""
        if self._steps is None:
            self._steps = [m.step if m is not None else None for m in (s.read_meta() for s in self.slots)]
        steps = self._steps
        pinned = self.buddy.pinned  # the buddy copies of these exist everywhere: keep them
        index = min(range(SLOTS), key=lambda i: (steps[i] is not None and steps[i] in pinned,
                                                 steps[i] is not None, steps[i] or 0))
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
            self.buddy.offer(None, None, meta.step)  # the round still runs: the buddy expects it
            return
        self.buddy.offer(slot, data, meta.step)

    def wait(self) -> None:
        """Finish the copy in flight; raise its error, if any."""
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise CheckpointError(f"snapshot in {self.rank_dir} failed: {error}") from error

    def settle(self) -> None:
        """Finish the copy and the buddy exchanges in flight; raise their error, if any."""
        self.wait()
        try:
            self.buddy.wait()
        except BaseException as error:
            raise CheckpointError(f"sending snapshots to the buddy rank {self.buddy.buddy} failed: "
                                  f"{error}") from error

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
            temp.write_text(json.dumps({"root": self.root, "identity": identity(self.root)}))
            os.replace(temp, owner)
        rings = self.slots + (self.buddy.held if self.buddy.enabled else [])
        held = sum(s.data_path.stat().st_size for s in rings if s.data_path.exists())
        copies = 2 if self.buddy.enabled else 1  # its own, and the one held for a buddy
        need = SLOTS * size * self.ctx.local_world_size * copies
        free = shutil.disk_usage(self.dir).free + held * self.ctx.local_world_size
        short = torch.tensor([1.0 if need > free else 0.0])
        if self.ctx.distributed:
            dist.all_reduce(short, op=dist.ReduceOp.MAX)
        if short.item() > 0:
            remove(self.root)
            room = f"only {free / _MIB:.1f} MiB are" if need > free else "another node has less"
            raise CheckpointError(
                f"snapshots need {need / _MIB:.1f} MiB in {base_dir()} on a node ({SLOTS} slots x "
                f"{size / _MIB:.1f} MiB x {self.ctx.local_world_size} ranks"
                f"{' x 2: own and buddy copies' if copies == 2 else ''}) but {room}"
                " free; enlarge it (docker run --shm-size=..., or mount -o remount,size=... /dev/shm), "
                "set DISTRAIN_SNAPSHOT_DIR to a larger tmpfs, or take snapshots off (snapshot_every=None)")
        self._checked = True

    # -- finding and restoring -----------------------------------------------------------

    def complete(self) -> dict[int, Slot]:
        """This rank's own complete slots by step (what :meth:`agree` may use: :meth:`inventory`)."""
        return self._complete(self.slots)

    @staticmethod
    def _complete(slots: list[Slot]) -> dict[int, Slot]:
        found = {}
        for slot in slots:
            meta = slot.read_meta()
            if meta is not None:
                found[meta.step] = slot
        return found

    def inventory(self) -> list[Held]:
        """Every complete slot on this node: all ranks' rings and the rings held for buddies."""
        found = []
        for ring in sorted(self.dir.glob("rank-*")) + sorted(self.dir.glob(f"{HELD}*")):
            for index in range(SLOTS):
                meta = Slot(ring, index).read_meta()
                if meta is not None:
                    found.append(Held(owner=meta.rank, step=meta.step, world_size=meta.world_size,
                                      ring=ring.name, index=index))
        return found

    def agree(self, *, exact: bool = False) -> int | None:
        """The newest step every rank can restore (from its node, or from the rank holding its
        copy), every slot it needs verified, or None. ``exact``: each rank needs its own
        state of a snapshot of this world size (FSDP shards)."""
        self.settle()
        inventories = _gather(self.ctx, self.inventory())
        excluded: set[int] = set()
        while True:
            found = choose(inventories, exact=exact, excluded=frozenset(excluded))
            if found is None:
                self._plan = None
                return None
            step, sources = found
            good = all(self._verify(self._slot(s.slot), step) for s in sources if s.holder == self.ctx.rank)
            if _all(self.ctx, good):
                self._plan = (step, sources)
                return step
            excluded.add(step)

    def _slot(self, held: Held) -> Slot:
        return Slot(self.dir / held.ring, held.index)

    @staticmethod
    def _verify(slot: Slot, step: int) -> bool:
        meta = slot.read_meta()
        return meta is not None and meta.step == step and slot.verify(meta)

    def restore(self, step: int, objects: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
        """Put snapshot ``step`` (as :meth:`agree` chose it, on every rank) into ``objects`` and
        this rank's RNG; returns the JSON values."""
        if self._plan is None or self._plan[0] != step:
            raise CheckpointError(f"snapshot step {step} was not agreed on (call agree first)")
        sources = self._plan[1]
        me = self.ctx.rank
        received = fetch(self.ctx, [(s.holder, s.rank, self._slot(s.slot) if s.holder == me else None)
                                    for s in sources if s.remote])
        source = sources[me]
        where = (f"rank {source.holder}'s {source.slot.ring}" if source.remote
                 else str(self.dir / source.slot.ring))
        meta: SlotMeta | None
        if source.remote and received is not None:
            meta, data = received
            tensors = verified_copies(meta, data)
        else:
            slot = self._slot(source.slot)
            meta = slot.read_meta()
            tensors = slot.read(meta) if meta is not None else None
        if meta is None or tensors is None or meta.step != step:
            raise CheckpointError(f"snapshot step {step} in {where} changed while loading")
        try:
            state = decode(meta.skeleton, tensors)
        except (IndexError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"snapshot step {step} in {where} is damaged: {error}") from error
        saved = state["objects"]
        missing = sorted(set(objects) - set(saved))
        if missing:
            raise CheckpointError(f"snapshot step {step} holds no {', '.join(missing)}; "
                                  f"it holds {', '.join(sorted(saved))}")
        sharded = self._sharded_names(objects, kinds)
        if sharded:
            restore_local(self._pairing(objects, kinds), {name: saved[name] for name in sharded})
        for name, obj in objects.items():
            if name not in sharded:
                restore_object(name, obj, state["kinds"][name], saved[name])
        own = meta.rank == me  # else borrowed (the world grew): a derived seed
        restore_rank_rng({"ranks": [state["rng"]]}, rank=0 if own else me, step=step)
        self._plan = None
        return {name: saved[name] for name in objects if kinds[name] == "json"}

    def _sharded_names(self, objects: dict[str, Any], kinds: dict[str, str]) -> set[str]:
        """The FSDP models among ``objects`` and their optimizers (worked out once per set of objects)."""
        key = tuple((name, id(obj)) for name, obj in objects.items())
        if key != self._shards[0]:
            fsdp = any(is_fsdp(obj) for obj in objects.values())
            pairing = pair(objects, kinds) if fsdp else None
            names = pairing.sharded_names() if pairing is not None else set()
            # The objects are kept with the key: their ids stay unique while it is used.
            self._shards = (key, list(objects.values()), pairing, names)
        return self._shards[3]

    def _pairing(self, objects: dict[str, Any], kinds: dict[str, str]) -> Pairing:
        self._sharded_names(objects, kinds)
        pairing = self._shards[2]
        if pairing is None:
            raise CheckpointError("no FSDP model among the snapshot's objects")
        return pairing

    # -- dropping -------------------------------------------------------------------------

    def drop(self, *, through: int | None = None, after: int | None = None) -> None:
        """Invalidate slots up to ``through`` (a durable checkpoint of that step exists) and
        after ``after`` (states of an abandoned timeline: resumed from an older step); all of
        them when neither is given."""
        self.settle()
        for slot in self.slots + self.buddy.held:
            meta = slot.read_meta()
            if meta is None:
                continue
            if (through is None and after is None) or (through is not None and meta.step <= through) \
                    or (after is not None and meta.step > after):
                slot.invalidate()
        self._steps = None

    def close(self) -> None:
        """At cleanup and exit: wait; when the script ends cleanly, remove this rank's snapshots."""
        clean = sys.exc_info()[0] is None and not hasattr(sys, "last_value")
        try:
            if clean:
                self.settle()
            else:  # a peer may be gone: do not wait for an exchange with it
                self.wait()
        finally:
            self.buddy.close(join=clean)
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()
            if clean:
                shutil.rmtree(self.rank_dir, ignore_errors=True)
                shutil.rmtree(self.buddy.dir, ignore_errors=True)
                if self.ctx.local_rank == 0:  # ranks of a larger world that ran here before
                    for other in self.dir.glob("rank-*"):
                        if int(other.name.split("-")[1]) >= self.ctx.world_size:
                            shutil.rmtree(other, ignore_errors=True)
                if not any(self.dir.glob("rank-*")):
                    shutil.rmtree(self.dir, ignore_errors=True)


def _skeleton_json(memo: JsonMemo, states: list[Any], kinds: Any, rng: Any) -> str:
    """The snapshot's skeleton as JSON, ``json.dumps`` of ``["d", ["objects", ["d", states],
    "kinds", kinds, "rng", rng]]`` (what :meth:`Snapshots.restore` decodes), from pieces that
    mostly repeat; the object names are the memo's keys (kinds and RNG use tuple keys)."""
    pieces = [json.dumps(states[i]) + ", " + memo.dumps(states[i], states[i + 1])
              for i in range(0, len(states), 2)]
    return (f'["d", ["objects", ["d", [{", ".join(pieces)}]], '
            f'"kinds", {memo.dumps(("kinds",), kinds)}, "rng", {memo.dumps(("rng",), rng)}]]')


def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` for all i, in one call where torch has one."""
    with torch.no_grad():
        try:  # one call; not checked per tensor first: it runs after every step
            torch._foreach_copy_(targets, sources)
        except RuntimeError:  # e.g. tensors on several devices: one by one (a copy is idempotent)
            for target, source in zip(targets, sources):
                target.copy_(source)


def _optimizer_tensors(objects: dict[str, Any],
                       local: Callable[[torch.Tensor], torch.Tensor] | None = None) -> set[int]:
    """Storages an optimizer step writes: its parameters and its state tensors (``local``:
    a sharded tensor's local part, whose storage the snapshot's tensor shares)."""
    def storage(tensor: torch.Tensor) -> int:
        return (local(tensor) if local is not None else tensor).untyped_storage().data_ptr()

    found: set[int] = set()
    for obj in objects.values():
        if isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                found.update(storage(p) for p in group["params"])
            for values in obj.state.values():
                found.update(storage(v) for v in values.values() if isinstance(v, torch.Tensor))
    return found


def _waiter(snapshots: Snapshots) -> Callable[..., None]:
    import weakref

    ref = weakref.ref(snapshots)

    def wait_for_copy(*_: Any) -> None:
        target = ref()
        if target is not None:
            target.wait()

    return wait_for_copy


def _gather(ctx: Context, held: list[Held]) -> list[list[Held]]:
    if not ctx.distributed:
        return [held]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, held)
    return gathered


def _all(ctx: Context, ok: bool) -> bool:
    if not ctx.distributed:
        return ok
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, ok)
    return all(gathered)
