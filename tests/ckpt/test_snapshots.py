"""In-memory snapshots: lose at most one step to a SIGKILL, resume exactly, leave nothing in /dev/shm.

Real processes throughout: the worker is ``bench/workers/fault_train.py`` (DDP, dropout, shuffled
resumable loader, a durable checkpoint every 50 steps, a snapshot after every step) under
``distrain launch --max-restarts``; its rank kills itself with SIGKILL at a random step.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import subprocess
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.fault_trials import identical
from distrain.ckpt import Checkpointer, CheckpointError
from distrain.ckpt.rng_cache import RngCache
from distrain.ckpt.skeleton import JsonMemo, decode, encode, encode_state
from distrain.ckpt.snapshot import Snapshots, run_dir
from distrain.ckpt.snapshot_files import HEADER, Slot, SlotMeta, digest
from distrain.ckpt.state import capture_rng
from distrain.errors import ConfigError
from tests.helpers import ABORT_LINE, REPO, distrain, kill_forked_at
from tests.helpers.ckpt import CTX

SCRIPT = str(REPO / "bench" / "workers" / "fault_train.py")
STEPS = 60
RESUMED = re.compile(r"resumed from (snapshot step|step) (\d+)")


def train(ckpt: Path, out: Path, *extra: str, nproc: int = 2, max_restarts: int = 1,
          steps: int = STEPS) -> subprocess.CompletedProcess[str]:
    return distrain("launch", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
                    SCRIPT, "--ckpt", str(ckpt), "--out", str(out), "--steps", str(steps),
                    "--save-every", "50", *extra, timeout=240)


def resumed(result: subprocess.CompletedProcess[str]) -> tuple[str, int]:
    found = RESUMED.findall(result.stdout + result.stderr)
    assert found, f"the run never resumed:\n{(result.stdout + result.stderr)[-3000:]}"
    return found[-1][0], int(found[-1][1])


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    text = result.stdout + result.stderr
    assert ABORT_LINE not in text, text[-3000:]
    assert result.returncode == 0, f"rc={result.returncode}\n{text[-3000:]}"


@pytest.fixture
def shm_clean(tmp_path: Path) -> Iterator[Path]:
    """The checkpoint root; its snapshots must be gone afterwards (removed here in any case)."""
    root = tmp_path / "ckpt"
    try:
        yield root
    finally:
        left = run_dir(root).exists()
        shutil.rmtree(run_dir(root), ignore_errors=True)
    assert not left, f"snapshots left in {run_dir(root)}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (no snapshots): its final weights and optimizer state."""
    base = tmp_path_factory.mktemp("reference")
    assert_ok(train(base / "ckpt", base / "out", max_restarts=0))
    return base / "out" / "final.pt"


# -- one process ---------------------------------------------------------------------------


def _objects(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object) -> None:
    loss = model(torch.randn(4, 8)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()  # type: ignore[attr-defined]


def test_a_snapshot_restores_the_exact_state_and_is_removed_at_the_end(shm_clean: Path) -> None:
    model, optimizer, scheduler = _objects(0)
    ckpt = Checkpointer(shm_clean, CTX, snapshot_every=2)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    taken = [ckpt.snapshot(step, **state, extra={"step": step}) for step in (1, 2)]
    for _ in range(3):  # the first step waits for the copy of step 2, then changes everything
        _step(model, optimizer, scheduler)
    assert taken == [False, True]
    expected_rng = torch.get_rng_state()
    expected = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict()})
    ckpt.snapshot(4, **state, extra={"step": 4})
    _step(model, optimizer, scheduler)
    torch.randn(3)

    fresh, fresh_opt, fresh_sched = _objects(1)
    extra: dict[str, int] = {}
    loader = Checkpointer(shm_clean, CTX, snapshot_every=2)
    assert loader.load_latest(model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, extra=extra) == 4
    assert extra == {"step": 4} and loader.path is None
    assert torch.equal(torch.get_rng_state(), expected_rng)
    got = {"model": fresh.state_dict(), "optimizer": fresh_opt.state_dict(),
           "scheduler": fresh_sched.state_dict()}
    assert _equal(got, expected)
    assert run_dir(shm_clean).exists()
    loader.save(9, model=fresh)  # a durable checkpoint past every snapshot: they are redundant
    assert Snapshots(shm_clean, CTX, 1).complete() == {}
    from distrain import ddp

    ddp.cleanup()  # the script's clean end removes what is left
    assert not run_dir(shm_clean).exists()


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def test_the_structure_of_a_state_round_trips_through_json_with_its_types() -> None:
    state = OrderedDict(a={0: torch.arange(3), 1: (torch.ones(2, 2), [1, 2.5, None, True])},
                        b={"dtype": torch.float16, "size": torch.Size([2, 3]), "device": torch.device("cpu"),
                           "raw": b"\x00\xff", "z": 1 + 2j, "nan": float("nan"), "np": np.int64(7),
                           "set": {3, 4}, "layout": torch.strided, "nested": [[{"k": "v"}]]})
    tensors: list[torch.Tensor] = []
    text = json.dumps(encode(state, tensors))
    back = decode(json.loads(text), tensors)
    assert type(back) is OrderedDict and list(back) == ["a", "b"]
    assert list(back["a"]) == [0, 1] and type(back["a"][1]) is tuple
    assert torch.equal(back["a"][0], torch.arange(3)) and back["a"][1][1] == [1, 2.5, None, True]
    assert [type(v) for v in back["a"][1][1]] == [int, float, type(None), bool]
    b = back["b"]
    assert (b["dtype"], b["size"], b["device"], b["raw"], b["z"]) == \
        (torch.float16, torch.Size([2, 3]), torch.device("cpu"), b"\x00\xff", 1 + 2j)
    assert math.isnan(b["nan"]) and b["np"] == 7 and type(b["np"]) is int and b["set"] == {3, 4}
    assert b["layout"] is torch.strided and b["nested"] == [[{"k": "v"}]]
    with pytest.raises(ConfigError, match=r"model\.w.*numpy\.ndarray"):
        encode_state("model", {"w": np.zeros(2)}, [])


def test_the_json_memo_reuses_text_only_for_the_same_value_of_the_same_types() -> None:
    memo = JsonMemo()
    for value in ([1, "a"], [1, "a"], [1.0, "a"], [True, "a"], [True, "a"], ["d", [0, None]], [-0.0], [0.0]):
        assert memo.dumps("k", value) == json.dumps(value)


def test_a_json_value_that_changes_type_between_snapshots_resumes_with_its_new_type(shm_clean: Path) -> None:
    ckpt = Checkpointer(shm_clean, CTX, snapshot_every=1)
    for step, flag in enumerate((1, True, 1.0), start=1):  # equal under ==, not as JSON
        ckpt.snapshot(step, extra={"flag": flag})
        ckpt.wait()
        extra: dict[str, object] = {}
        assert Checkpointer(shm_clean, CTX, snapshot_every=1).load_latest(extra=extra) == step
        assert type(extra["flag"]) is type(flag)
    from distrain import ddp

    ddp.cleanup()  # removes the snapshots


def test_rng_states_reused_only_while_unchanged() -> None:
    """A normal draw that returns the cached second value of a pair moves no key: still seen."""
    cache = RngCache()
    np.random.seed(5)
    random.seed(5)
    draws = [lambda: None, lambda: np.random.normal(), lambda: np.random.normal(),
             lambda: np.random.randint(9), lambda: random.gauss(0, 1), lambda: random.gauss(0, 1),
             lambda: random.random(), lambda: torch.rand(1), lambda: random.seed(7),
             lambda: random.setstate(random.getstate()), lambda: random.getrandbits(70)]
    for draw in draws * 2:
        draw()
        assert _equal(cache.capture(), capture_rng())


def test_a_slot_is_complete_only_while_its_commit_word_matches_its_meta(tmp_path: Path) -> None:
    slot = Slot(tmp_path, 0)
    data = slot.allocate(128)
    data.fill_(7)
    meta = SlotMeta(step=3, world_size=1, rank=0, size=128, digest=digest(data), specs=(), offsets=[],
                    skeleton=["l", [1.5]])
    slot.commit(meta)
    reader = Slot(tmp_path, 0)  # as another process sees the files
    found = reader.read_meta()
    assert found is not None and (found.step, found.digest, found.skeleton) == (3, meta.digest, ["l", [1.5]])
    slot.invalidate()  # one store into the mapping: the file stays, the slot is incomplete
    assert slot.meta_path.exists() and reader.read_meta() is None
    slot.commit(meta)
    word = HEADER.size - 24  # the commit word's offset
    with open(slot.meta_path, "r+b", buffering=0) as file:
        whole = file.read()
        file.seek(word)
        file.write(bytes(4))  # the first half of the word zeroed: as a store cut short leaves it
    assert reader.read_meta() is None
    with open(slot.meta_path, "r+b", buffering=0) as file:
        file.write(whole)
        assert reader.read_meta() is not None
        file.seek(HEADER.size + 5)
        file.write(b"9" if whole[HEADER.size + 5:HEADER.size + 6] != b"9" else b"8")  # a flipped JSON byte
    assert reader.read_meta() is None
    meta.skeleton = ["l", list(range(5000))]  # outgrows the mapped meta file: a larger one replaces it
    slot.commit(meta)
    found = reader.read_meta()
    assert found is not None and found.skeleton == ["l", list(range(5000))]


def _snapshot_forever(root: Path, ready: int) -> None:
    """The forked writer: snapshots of steps 1, 2, 3, ... (weights = step) until killed."""
    torch.set_num_threads(1)  # OpenMP's pool does not survive fork
    model = nn.Linear(1024, 512)  # 2 MB: the copy and its CRC take a while
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # its parameters: copied in the background
    snapshots = Snapshots(root, CTX, 1)
    step = max(snapshots.complete(), default=0) + 1
    os.write(ready, b"r")
    while True:
        snapshots.wait()  # what the optimizer's step pre-hook does in training
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.bias.fill_(float(step))
        snapshots.take(step, {"model": model, "optimizer": optimizer},
                       {"model": "module", "optimizer": "state_dict"})
        step += 1


@pytest.mark.timeout(120)
def test_sigkill_in_the_middle_of_a_copy_leaves_the_previous_snapshot_complete(shm_clean: Path) -> None:
    rng = random.Random(20261130)
    interrupted, newest = 0, 0
    for trial in range(10):
        kill_forked_at(lambda ready: _snapshot_forever(shm_clean, ready), rng.uniform(0.0, 0.2),
                       f"trial {trial}")
        snapshots = Snapshots(shm_clean, CTX, 1)
        slots = [Slot(snapshots.rank_dir, i) for i in range(3)]
        interrupted += sum(s.data_path.exists() and s.read_meta() is None for s in slots)
        complete = snapshots.complete()
        assert complete, f"trial {trial}: no complete snapshot"
        for step, slot in complete.items():  # every slot that claims completeness is complete
            meta = slot.read_meta()
            tensors = slot.read(meta) if meta is not None else None
            assert tensors is not None, f"trial {trial}: step {step} fails its CRC"
            assert all(torch.all(t == step) for t in tensors if t.is_floating_point())
        assert max(complete) >= newest, f"trial {trial}: went back from {newest} to {max(complete)}"
        newest = max(complete)
        model = nn.Linear(1024, 512)
        assert snapshots.agree() == newest
        snapshots.restore(newest, {"model": model}, {"model": "module"})
        assert torch.all(model.weight == newest)
    assert interrupted > 0, "no kill landed inside a copy: the test proves nothing"
    shutil.rmtree(run_dir(shm_clean))


def test_not_enough_shared_memory_is_one_clear_error_at_the_first_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = tmp_path / "small-shm"
    small.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        monkeypatch.setenv("DISTRAIN_SNAPSHOT_DIR", str(small))
        ckpt = Checkpointer(tmp_path / "ckpt", CTX, snapshot_every=1)
        with pytest.raises(CheckpointError) as raised:
            ckpt.snapshot(1, model=nn.Linear(1024, 1024))
        message = str(raised.value)
        assert "\n" not in message, message
        assert re.search(r"snapshots need 12\.\d MiB in .* but only 1\.0 MiB are free", message), message
        assert "snapshot_every=None" in message and "snapshot_every=None" in message, message
        assert not any(small.iterdir()), "the failed snapshot left files behind"
    finally:
        subprocess.run(["umount", str(small)], check=True)


# -- real runs -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_of_a_random_rank_at_a_random_step_loses_at_most_one_step(
        tmp_path: Path, reference: Path) -> None:
    seed = int(time.time())
    rng = random.Random(seed)
    for trial in range(3):
        victim, kill_at = rng.randrange(2), rng.randrange(2, STEPS - 1)
        ckpt, out = tmp_path / f"ckpt{trial}", tmp_path / f"out{trial}"
        try:
            result = train(ckpt, out, "--snapshot-every", "1", "--kill-rank", str(victim),
                           "--kill-at", str(kill_at))
            where = f"seed {seed} trial {trial}: rank {victim} killed at step {kill_at}"
            assert_ok(result)
            source, step = resumed(result)
            assert step >= kill_at - 1, f"{where}: resumed from {source} {step}"
            assert identical(reference, out / "final.pt"), f"{where}: final state differs"
            assert not run_dir(ckpt).exists(), f"{where}: snapshots left in {run_dir(ckpt)}"
        finally:
            shutil.rmtree(run_dir(ckpt), ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_snapshot_from_four_ranks_resumes_on_two(tmp_path: Path, shm_clean: Path) -> None:
    out, steps = tmp_path / "out", 20
    failed = train(shm_clean, out / "four", "--snapshot-every", "1", "--kill-rank", "3",
                   "--kill-at", "11", nproc=4, max_restarts=0, steps=steps)
    assert failed.returncode != 0, "the run with a killed rank and no restarts succeeded"
    kept = sorted(p.name for p in run_dir(shm_clean).glob("rank-*"))
    assert kept == [f"rank-{r:05d}" for r in range(4)], kept  # a failed run keeps its snapshots
    result = train(shm_clean, out / "two", "--snapshot-every", "1", nproc=2, max_restarts=0, steps=steps)
    assert_ok(result)
    source, step = resumed(result)
    assert (source, step >= 10) == ("snapshot step", True), (source, step)
    # The same with a durable checkpoint at that step: four ranks stop there, two go on.
    assert_ok(train(tmp_path / "ref", out / "ref-four", nproc=4, max_restarts=0, steps=step))
    assert_ok(train(tmp_path / "ref", out / "ref-two", nproc=2, max_restarts=0, steps=steps))
    assert identical(out / "ref-two" / "final.pt", out / "two" / "final.pt")


@pytest.mark.timeout(400)
def test_fsdp_shards_resume_from_the_snapshot_after_a_sigkill(tmp_path: Path) -> None:
    """FSDP on 2 ranks: each rank snapshots its own shard; a rank is SIGKILLed, the launcher
    restarts the group, every rank restores its shard of the newest common step, and the run
    ends torch.equal to an uninterrupted FSDP run."""
    steps, kill_at = 24, random.Random().randrange(3, 22)
    fsdp = ("--strategy", "fsdp")
    assert_ok(train(tmp_path / "ref", tmp_path / "ref-out", *fsdp, max_restarts=0, steps=steps))
    ckpt = tmp_path / "ckpt"
    try:
        result = train(ckpt, tmp_path / "out", *fsdp, "--snapshot-every", "1", "--kill-rank", "1",
                       "--kill-at", str(kill_at), steps=steps)
        assert_ok(result)
        source, step = resumed(result)
        assert source == "snapshot step" and step >= kill_at - 1, (source, step, kill_at)
        assert identical(tmp_path / "ref-out" / "final.pt", tmp_path / "out" / "final.pt"), \
            f"killed at {kill_at}, resumed from {step}: the final state differs"
        assert not run_dir(ckpt).exists(), f"snapshots left in {run_dir(ckpt)}"
    finally:
        shutil.rmtree(run_dir(ckpt), ignore_errors=True)
