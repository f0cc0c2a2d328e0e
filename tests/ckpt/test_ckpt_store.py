"""Checkpoints in one process: layout, retention, verification, corruption, failures, safety.

Real files everywhere (the crash test is tests/ckpt/test_ckpt_crash.py).
"""

from __future__ import annotations

import json
import pickle
import random
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distrain.ckpt import Checkpointer, CheckpointError, CheckpointWarning, UnsafeCheckpointError
from distrain.ckpt.state import capture_rng, restore_rank_rng, restore_rng
from distrain.ckpt.store import CheckpointStore, select_for_deletion, verify
from distrain.errors import ConfigError
from tests.helpers.ckpt import CTX, Payload, rewrite_manifest


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Dropout(0.3), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Counter:
    """A user object with state_dict/load_state_dict."""

    def __init__(self) -> None:
        self.count = 0
        self.history = torch.zeros(3)

    def state_dict(self) -> dict[str, object]:
        return {"count": self.count, "history": self.history}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.count = int(state["count"])  # type: ignore[call-overload]
        self.history = state["history"]  # type: ignore[assignment]


def trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(2):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)




# -- save / load ---------------------------------------------------------------------------


def test_roundtrip_restores_every_object_and_the_rng(tmp_path: Path) -> None:
    model, optimizer, scheduler = trained()
    wrapped = nn.DataParallel(model)  # a wrapper: the saved keys must not carry "module."
    counter = Counter()
    counter.count, counter.history = 7, torch.tensor([1.0, 2.0, 3.0])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ckpt = Checkpointer(tmp_path, CTX)
    random.seed(1)
    np.random.seed(2)
    ckpt.save(5, model=wrapped, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
              counter=counter, extra={"lr": 0.01, "note": "x"}, epoch=3)
    expected_draws = (torch.rand(3), np.random.rand(3), random.random())

    fresh, fresh_opt, fresh_sched = Net(), None, None
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    fresh_counter, extra = Counter(), {"stale": True}
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    loader = Checkpointer(tmp_path, CTX)
    step = loader.load_latest(model=nn.DataParallel(fresh), optimizer=fresh_opt,
                              scheduler=fresh_sched, scaler=torch.amp.GradScaler("cpu", enabled=False),
                              counter=fresh_counter, extra=extra)
    assert step == 5
    assert same_tensors(fresh.state_dict(), model.state_dict())
    assert fresh_opt.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for key, state in optimizer.state_dict()["state"].items():
        assert same_tensors(fresh_opt.state_dict()["state"][key], state)
    assert fresh_sched.state_dict() == scheduler.state_dict()
    assert fresh_counter.count == 7 and torch.equal(fresh_counter.history, counter.history)
    assert extra == {"lr": 0.01, "note": "x"} and loader.values["epoch"] == 3
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert np.array_equal(np.random.rand(3), expected_draws[1])
    assert random.random() == expected_draws[2]
    # The weights alone load into a plain module with plain torch.load: no distrain needed.
    bare = Net()
    bare.load_state_dict(torch.load(tmp_path / "step-00000005" / "model.pt", weights_only=True))
    assert same_tensors(bare.state_dict(), model.state_dict())
    manifest = json.loads((tmp_path / "step-00000005" / "manifest.json").read_text())
    assert manifest["kind"] == "full" and manifest["step"] == 5 and manifest["world_size"] == 1
    assert {"torch", "distrain", "time", "hostname"} <= manifest.keys()
    assert (tmp_path / "latest").read_text().strip() == "step-00000005"


def test_empty_root_loads_nothing_and_bad_input_is_refused(tmp_path: Path) -> None:
    model = Net()
    ckpt = Checkpointer(tmp_path, CTX)
    before = torch.get_rng_state()
    assert ckpt.load_latest(model=model) is None
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(ConfigError, match="step=-1"):
        ckpt.save(-1, model=model)
    with pytest.raises(ConfigError, match="rng"):
        ckpt.save(1, rng=model)
    with pytest.raises(ConfigError, match="JSON"):
        ckpt.save(1, model=model, thing=object())
    with pytest.raises(ConfigError, match="pass epoch=\\{\\}"):
        ckpt.load_latest(model=model, epoch=0)  # a JSON value comes back in a dict, or .values
    with pytest.raises(ConfigError, match="keep_last"):
        Checkpointer(tmp_path, CTX, keep_last=0)

    class NumpyState:
        def state_dict(self) -> dict[str, object]:
            return {"table": np.zeros(3)}

        def load_state_dict(self, state: dict[str, object]) -> None: ...

    with pytest.raises(ConfigError, match=r"weird\.table.*numpy"):
        ckpt.save(1, model=model, weird=NumpyState())
    assert CheckpointStore(tmp_path).checkpoints() == []
    ckpt.save(1, model=model)
    with pytest.raises(CheckpointError, match="holds no optimizer"):
        ckpt.load_latest(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_retention_rule() -> None:
    steps = range(1, 11)
    assert select_for_deletion(steps, keep_last=3, keep_every=None) == [1, 2, 3, 4, 5, 6, 7]
    assert select_for_deletion(steps, keep_last=2, keep_every=4) == [1, 2, 3, 5, 6, 7]
    assert select_for_deletion(steps, keep_last=1, keep_every=None, protect=[4]) == [
        1, 2, 3, 5, 6, 7, 8, 9]
    assert select_for_deletion(steps, keep_last=None, keep_every=None) == []


def test_retention_on_disk_and_resave_of_a_step(tmp_path: Path) -> None:
    model = Net()
    ckpt = Checkpointer(tmp_path, CTX, keep_last=2, keep_every=4)
    for step in range(1, 11):
        ckpt.save(step, model=model)
    store = CheckpointStore(tmp_path)
    assert [s for s, _ in store.checkpoints()] == [4, 8, 9, 10]
    assert store.latest_name() == "step-00000010"
    with torch.no_grad():
        model.body[0].weight.fill_(1.5)
    ckpt.save(10, model=model)  # the same step again replaces it
    assert [s for s, _ in store.checkpoints()] == [4, 8, 9, 10]
    fresh = Net()
    assert ckpt.load_latest(model=fresh) == 10 and float(fresh.body[0].weight[0, 0].detach()) == 1.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- corruption and hostile files ----------------------------------------------------------


def test_bit_flip_is_named_by_verify_and_load_falls_back(tmp_path: Path) -> None:
    model, optimizer, _ = trained()
    ckpt = Checkpointer(tmp_path, CTX)
    ckpt.save(1, model=model, optimizer=optimizer)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.body[0].weight.add_(1.0)
    ckpt.save(2, model=model, optimizer=optimizer)
    target = tmp_path / "step-00000002" / "model.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    target.write_bytes(bytes(data))

    result = verify(tmp_path / "step-00000002")
    assert not result.ok and result.problems == ("model.pt: xxh3_128 mismatch (the file is corrupt)",)
    fresh = Net()
    with pytest.warns(CheckpointWarning, match=r"step-00000002: model\.pt: xxh3_128 mismatch"):
        assert Checkpointer(tmp_path, CTX).load_latest(model=fresh) == 1
    assert same_tensors(fresh.state_dict(), first)

    manifest = tmp_path / "step-00000001" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"step": 1', '"step": 7'))
    assert "manifest.json: checksum mismatch" in verify(manifest.parent).problems[0]
    with pytest.warns(CheckpointWarning) as skipped:
        assert Checkpointer(tmp_path, CTX).load_latest(model=fresh) is None
    assert [str(w.message).split(": ")[0].rsplit("/", 1)[1] for w in skipped] == [
        "step-00000002", "step-00000001"]


def test_manifests_recording_sha256_still_verify_and_load(tmp_path: Path) -> None:
    """Checkpoints written before xxh3_128 record sha256 digests: still checked, still loaded."""
    model, optimizer, _ = trained()
    Checkpointer(tmp_path, CTX).save(3, model=model, optimizer=optimizer)
    path = tmp_path / "step-00000003"
    manifest = json.loads((path / "manifest.json").read_text())
    assert all(set(entry) == {"xxh3_128", "size"} for entry in manifest["files"].values())
    for name in manifest["files"]:
        rewrite_manifest(path, name)  # the old format, file by file
    assert verify(path).ok
    fresh = Net()
    assert Checkpointer(tmp_path, CTX).load_latest(model=fresh) == 3
    assert same_tensors(fresh.state_dict(), model.state_dict())

    data = bytearray((path / "optimizer.pt").read_bytes())
    data[len(data) // 3] ^= 0x10
    (path / "optimizer.pt").write_bytes(bytes(data))
    assert verify(path).problems == ("optimizer.pt: sha256 mismatch (the file is corrupt)",)




@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, container: str) -> None:
    root, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    Checkpointer(root, CTX).save(3, model=Net())
    target = root / "step-00000003" / "model.pt"
    if container == "torch-zip":
        torch.save({"body.0.weight": Payload(marker)}, target)
    else:
        target.write_bytes(pickle.dumps({"body.0.weight": Payload(marker)}, protocol=2))
    rewrite_manifest(target.parent, "model.pt")  # the manifest agrees: only the content is hostile
    assert verify(target.parent).ok

    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*model\.pt.*would run code"):
        Checkpointer(root, CTX).load_latest(model=Net())
    assert not marker.exists()
    # The payload is live: an unsafe loader does run it.
    with open(target, "rb") as file:
        torch.load(file, weights_only=False) if container == "torch-zip" else pickle.load(file)
    assert marker.exists()


# -- failures while writing ----------------------------------------------------------------


@contextmanager
def file_size_limit(num_bytes: int) -> Iterator[None]:
    """A real write failure: writes past ``num_bytes`` fail with EFBIG, as a full disk fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_full_disk_gives_a_clear_error_and_loses_nothing(tmp_path: Path) -> None:
    model, optimizer, _ = trained()
    model = nn.Sequential(nn.Linear(256, 256), model.body)  # about 260 KB of state
    ckpt = Checkpointer(tmp_path, CTX)
    ckpt.save(1, model=model)
    in_memory = {k: v.clone() for k, v in model.state_dict().items()}
    with file_size_limit(64 * 1024), pytest.raises(CheckpointError) as failure:
        ckpt.save(2, model=model, optimizer=optimizer)
    message = str(failure.value)
    assert "could not write checkpoint step 2" in message and "File too large" in message
    assert "step-00000001 is still the newest checkpoint" in message
    assert same_tensors(model.state_dict(), in_memory)
    store = CheckpointStore(tmp_path)
    assert [s for s, _ in store.checkpoints()] == [1] and store.latest_name() == "step-00000001"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    ckpt.save(2, model=model, optimizer=optimizer)  # space is back: the same state saves fine
    fresh = nn.Sequential(nn.Linear(256, 256), Net().body)
    assert ckpt.load_latest(model=fresh) == 2 and same_tensors(fresh.state_dict(), in_memory)


def test_unwritable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"checkpoint root=.*a-file/ckpt.*writable directory"):
        Checkpointer(blocker / "ckpt", CTX)
    root = tmp_path / "ckpt"
    ckpt = Checkpointer(root, CTX)
    root.rmdir()
    root.write_text("the directory was replaced by a file")
    model = Net()
    with pytest.raises(CheckpointError, match=r"could not write checkpoint step 1 .*Not a directory"):
        ckpt.save(1, model=model)


# -- async ---------------------------------------------------------------------------------


def test_async_save_writes_what_sync_writes_and_snapshots_first(tmp_path: Path) -> None:
    model, optimizer, scheduler = trained()
    sync = Checkpointer(tmp_path / "sync", CTX)
    background = Checkpointer(tmp_path / "async", CTX, async_save=True)
    torch.manual_seed(5)
    sync.save(4, model=model, optimizer=optimizer, scheduler=scheduler, extra={"k": 1})
    torch.manual_seed(5)
    background.save(4, model=model, optimizer=optimizer, scheduler=scheduler, extra={"k": 1})
    with torch.no_grad():  # training goes on while the thread writes: it must not leak in
        for parameter in model.parameters():
            parameter.add_(100.0)
    background.wait()
    for name in ("model.pt", "optimizer.pt", "scheduler.pt", "rng.pt", "extra.json"):
        assert (tmp_path / "sync/step-00000004" / name).read_bytes() == \
            (tmp_path / "async/step-00000004" / name).read_bytes(), name
    assert verify(tmp_path / "async/step-00000004").ok


def test_async_saves_reuse_their_staging_copies_and_each_checkpoint_keeps_its_own_state(
        tmp_path: Path) -> None:
    model, optimizer, _ = trained()
    ckpt = Checkpointer(tmp_path, CTX, async_save=True, keep_last=None)
    expected, staged = {}, []
    for step in (1, 2, 3):
        ckpt.save(step, model=model, optimizer=optimizer)  # waits for the previous write first
        staged.append({key: tensor.data_ptr() for key, tensor in ckpt._staging.items()})
        assert staged[-1] == staged[0], "the copies were not reused"
        expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():  # the next save overwrites the staging copies in place
            for parameter in model.parameters():
                parameter.mul_(-2.0).add_(step)
    ckpt.wait()
    for step, state in expected.items():
        saved = torch.load(tmp_path / f"step-{step:08d}" / "model.pt", weights_only=True)
        assert all(torch.equal(saved[k], v) for k, v in state.items()), step
        assert verify(tmp_path / f"step-{step:08d}").ok


@pytest.mark.parametrize("width", [256, 1024], ids=["page-cache", "direct-io"])
def test_async_background_error_surfaces_on_the_next_call(tmp_path: Path, width: int) -> None:
    model = nn.Linear(width, width)  # 1024: a 4 MB weight, written by direct I/O from its staging copy
    ckpt = Checkpointer(tmp_path, CTX, async_save=True)
    with file_size_limit(64 * 1024):
        ckpt.save(1, model=model)  # returns at once; the write fails in the background
        with pytest.raises(CheckpointError, match=r"background checkpoint write failed: .*File too large"):
            ckpt.wait()
        ckpt.save(2, model=model)
        with pytest.raises(CheckpointError, match="background checkpoint write failed"):
            ckpt.save(3, model=model)  # joins save 2, which failed: its error comes out here
    ckpt.wait()  # reported once, not twice; save 3 never started
    ckpt.save(4, model=model)
    ckpt.wait()
    assert [s for s, _ in CheckpointStore(tmp_path).checkpoints()] == [4]


# -- RNG -----------------------------------------------------------------------------------


def test_rng_restore_and_derivation_for_new_ranks() -> None:
    torch.manual_seed(3)
    saved = {"world_size": 2, "ranks": [capture_rng(), None]}
    torch.manual_seed(4)
    saved["ranks"][1] = capture_rng()
    draws = []
    for rank in (0, 1, 2, 3, 2):  # ranks 2 and 3 did not exist when the checkpoint was written
        restore_rank_rng(saved, rank=rank, step=10)
        draws.append((torch.rand(2), np.random.rand(), random.random()))
    restore_rng(saved["ranks"][1])
    assert torch.equal(draws[1][0], torch.rand(2))
    assert torch.equal(draws[2][0], draws[4][0]) and draws[2][1:] == draws[4][1:]  # deterministic
    firsts = [d[0] for d in draws[:4]]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])
