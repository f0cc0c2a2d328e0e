"""Sharded checkpoints under faults: a rank SIGKILLed mid-save, bit flips, hostile files.

The crash trials fork two real gloo ranks from this process (torch is already imported, so a
trial costs a fraction of a second instead of two fresh interpreters). The ranks save sharded
checkpoints of an FSDP model and its optimizer in a loop; at a random instant one rank, chosen at
random, is SIGKILLed, and then the other (which would wait for its peer until the gloo timeout,
as an elastic agent would kill it). Whatever the instant, every ``step-*`` directory is complete
and ``load_latest`` returns the newest one, here in a process of its own with no process group.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from distrain.ckpt import Checkpointer, CheckpointWarning, UnsafeCheckpointError, verify
from distrain.ckpt.cli import main
from distrain.ckpt.dcp_io import read_metadata, read_object, shard_names
from distrain.ckpt.store import CheckpointStore
from tests.helpers import free_port
from tests.helpers.ckpt import CTX, Payload, rewrite_manifest
from tests.helpers.sharded_train import Net

WIDTH = 384  # ~450 K parameters and as many momentum values: 1.8 MB per rank and save


def _rank_main(root: Path, rank: int, port: int, ready: int) -> None:
    """A forked rank: join a 2-rank gloo group, then save steps n, n+1, ... (weights = step)
    and write to ``ready`` once the first save is complete."""
    from distrain import ddp

    torch.set_num_threads(1)  # OpenMP's pool does not survive fork; one thread is safe
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    ctx = ddp.init("gloo", timeout=60)
    torch.manual_seed(0)
    model = ddp.wrap(Net(width=WIDTH), ctx, strategy="fsdp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()  # momentum buffers: the optimizer has sharded state too
    step = max((s for s, _ in CheckpointStore(root).checkpoints()), default=0) + 1
    ckpt = Checkpointer(root, ctx, keep_last=2)
    while True:
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float(step))
        ckpt.save(step, model=model, optimizer=optimizer, extra={"step": step})
        if ready >= 0:  # one save done: from now on the kill can land anywhere in the next ones
            os.write(ready, b"r")
            ready = -1
        step += 1


def _trial(root: Path, rng: random.Random) -> None:
    port, pids, pipes = free_port(), [], []
    for rank in (0, 1):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: no pytest teardown, ever
            try:
                os.close(read_end)
                _rank_main(root, rank, port, write_end)
            finally:
                os._exit(1)
        os.close(write_end)
        pids.append(pid)
        pipes.append(read_end)
    victim = rng.randrange(2)
    try:
        for read_end in pipes:
            assert os.read(read_end, 1) == b"r", "a rank did not start"
        time.sleep(rng.uniform(0.0, 0.2))  # fault injection: a random save of the loop ...
        _until_writing(root, victim)
        time.sleep(rng.uniform(0.0, 0.004))  # ... and a random point of the victim's shard write
    finally:
        for pid in (pids[victim], pids[1 - victim]):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for read_end in pipes:
            os.close(read_end)


def _until_writing(root: Path, rank: int) -> None:
    """Return once ``rank`` has begun writing its shard of a checkpoint (its file exists)."""
    deadline = time.monotonic() + 30
    while not any((tmp / f"__{rank}_0.distcp").exists() for tmp in root.glob(".tmp-*")):
        assert time.monotonic() < deadline, f"rank {rank} never started writing a shard"
        time.sleep(0.0005)  # polling the file system; the kill itself is what is timed


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root after 12 trials, each a 2-rank FSDP run killed at a random instant of its saves."""
    root = tmp_path_factory.mktemp("crash") / "ckpt"
    rng = random.Random(20261123)
    interrupted = 0
    for trial in range(12):
        _trial(root, rng)
        partial = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
        interrupted += any(any(f.suffix == ".distcp" for f in p.iterdir()) for p in partial)
        _check_root(root, trial)
    assert interrupted >= 6, f"only {interrupted} kills landed inside a shard write: the test proves little"
    return root


def _check_root(root: Path, trial: int) -> None:
    store = CheckpointStore(root)
    found = store.checkpoints()
    assert found, f"trial {trial}: no save ever completed"
    for _, path in found:  # whatever looks like a checkpoint is a complete one
        assert verify(path).ok, f"trial {trial}: {verify(path).problems}"
    latest = store.latest_name()
    if latest is not None:
        assert (root / latest).is_dir()
    model = Net(width=WIDTH)  # a plain model in a plain process: DCP reads the whole tensors
    loader = Checkpointer(root, CTX)
    step = loader.load_latest(model=model)
    assert step == found[-1][0], f"trial {trial}"
    assert all(torch.all(p == step) for p in model.parameters())
    assert loader.values == {"extra": {"step": step}}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_rank_killed_while_writing_its_shard_never_leaves_a_partial_checkpoint(crashed: Path) -> None:
    steps = [step for step, _ in CheckpointStore(crashed).checkpoints()]
    # keep_last=2 held through every crash: retention deletes only after a commit, so a kill
    # between the newest commit and its deletion leaves one more (the next save prunes it).
    assert len(steps) in (2, 3) and steps[-1] >= 12, steps


def _copy_newest_two(root: Path, dest: Path) -> tuple[Path, Path]:
    dest.mkdir()
    (older, _), (newer, _) = [(s, shutil.copytree(p, dest / p.name)) for s, p in
                              CheckpointStore(root).checkpoints()[-2:]]
    return dest / f"step-{older:08d}", dest / f"step-{newer:08d}"


@pytest.mark.timeout(120)
def test_a_bit_flip_in_any_shard_is_detected_and_skipped(crashed: Path, tmp_path: Path) -> None:
    older, newer = _copy_newest_two(crashed, tmp_path / "ckpt")
    files = sorted(json.loads((newer / "manifest.json").read_text())["files"])
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(files)
    for name in files:
        target = newer / name
        original = target.read_bytes()
        data = bytearray(original)
        data[random.Random(name).randrange(len(data))] ^= 0x04
        target.write_bytes(bytes(data))
        model = Net(width=WIDTH)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step = Checkpointer(tmp_path / "ckpt", CTX).load_latest(model=model)
        messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
        assert step == int(older.name[5:]), name
        assert len(messages) == 1 and str(newer) in messages[0]
        assert f"{name}: xxh3_128 mismatch" in messages[0]
        assert all(torch.all(p == step) for p in model.parameters())
        target.write_bytes(original)
    assert verify(newer).ok


def _hostile_copy(crashed: Path, tmp_path: Path) -> Path:
    """A copy of the newest checkpoint alone, for an attacker to edit."""
    _, newest = CheckpointStore(crashed).checkpoints()[-1]
    return Path(shutil.copytree(newest, tmp_path / "ckpt" / newest.name))


def test_a_hostile_metadata_pickle_is_refused_and_never_runs(crashed: Path, tmp_path: Path) -> None:
    newer, marker = _hostile_copy(crashed, tmp_path), tmp_path / "PWNED"
    (newer / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    rewrite_manifest(newer, ".metadata")  # the attacker also fixes the manifest: it verifies
    assert verify(newer).ok
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*\.metadata.*posix\.system"):
        Checkpointer(newer.parent, CTX).load_latest(model=Net(width=WIDTH))
    assert main(["inspect", str(newer)]) == 1
    assert main(["consolidate", str(newer), "--out", str(tmp_path / "m.pt")]) == 1
    assert not marker.exists() and not (tmp_path / "m.pt").exists()


def test_a_hostile_value_inside_a_shard_is_refused_and_never_runs(crashed: Path, tmp_path: Path) -> None:
    """DCP itself reads non-tensor values with ``torch.load(weights_only=False)``: plant one."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    newer, marker = _hostile_copy(crashed, tmp_path), tmp_path / "PWNED"
    metadata = read_metadata(newer, shard_names(json.loads((newer / "manifest.json").read_text())))
    index = next(i for i in metadata.storage_data if i.fqn == "optimizer.param_groups.0.lr")
    info = metadata.storage_data[index]
    hostile = io.BytesIO()
    torch.save(Payload(marker), hostile)
    shard = newer / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(hostile.getvalue())
    with open(shard, "ab") as file:
        file.write(hostile.getvalue())
    (newer / ".metadata").write_bytes(pickle.dumps(metadata))  # genuine classes only
    rewrite_manifest(newer, info.relative_path)
    rewrite_manifest(newer, ".metadata")
    with pytest.raises(UnsafeCheckpointError, match=r"param_groups\.0\.lr.*would run code"):
        read_object(newer, json.loads((newer / "manifest.json").read_text()), "optimizer")
    assert not marker.exists()
    assert main(["inspect", str(newer)]) == 0  # the metadata itself is genuine
    assert not marker.exists()
    # The same checkpoint through DCP's own reader: the payload runs (why the safe path exists).
    dcp_to_torch_save(newer, tmp_path / "unsafe.pt")
    assert marker.exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(crashed: Path, tmp_path: Path) -> None:
    newer = _hostile_copy(crashed, tmp_path)
    (tmp_path / "elsewhere.distcp").write_bytes((newer / "__0_0.distcp").read_bytes())
    metadata: Any = read_metadata(newer, ["__0_0.distcp", "__1_0.distcp"])
    for info in metadata.storage_data.values():
        if info.relative_path == "__0_0.distcp":
            info.relative_path = "../../elsewhere.distcp"
    (newer / ".metadata").write_bytes(pickle.dumps(metadata))
    rewrite_manifest(newer, ".metadata")
    with pytest.raises(UnsafeCheckpointError, match=r"points at '\.\./\.\./elsewhere\.distcp'"):
        Checkpointer(newer.parent, CTX).load_latest(model=Net(width=WIDTH))
