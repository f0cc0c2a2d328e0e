"""Exact resume across real launches: 2 gloo ranks, DDP, dropout, a shuffled loader with a worker.

Uninterrupted: 16 steps. Interrupted: 7 steps, save, the processes exit; a new launch resumes and
runs to 16. The final weights and optimizer state must be bit-identical. Then the step-7
checkpoint resumes on 1 rank and must take exactly the samples of the epoch not yet taken.
(tests/scripts/ckpt_train.py is the training script; 96 samples, 8 per rank per step: 6 steps per
epoch on 2 ranks, so step 7 is one step into epoch 1.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from distrain.ckpt import verify
from distrain.data.sampler import global_order
from distrain.ddp import Context
from tests.helpers import REPO, assert_ok, distrain, spawn_multi_process

SCRIPT = str(REPO / "tests" / "scripts" / "ckpt_train.py")
STEPS, STOP = 16, 7


def train(tmp: Path, name: str, nproc: int, *args: str) -> Path:
    out = tmp / name
    out.mkdir()
    result = distrain("launch", "--nproc-per-node", str(nproc), SCRIPT, "--out", str(out), *args,
                      timeout=150)
    assert_ok(result)
    return out


def seen(out: Path, rank: int) -> list[list[object]]:
    return json.loads((out / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """7 steps on 2 ranks with checkpoints at 4 and 7, then the processes exit."""
    tmp = tmp_path_factory.mktemp("stopped")
    ckpt = tmp / "ckpt"
    out = train(tmp, "first", 2, "--steps", str(STEPS), "--stop-at", str(STOP), "--save-at", "4",
                str(STOP), "--ckpt", str(ckpt))
    return ckpt, out


@pytest.mark.timeout(300)
def test_resume_in_a_new_launch_is_bit_identical(stopped_run: tuple[Path, Path], tmp_path: Path) -> None:
    stopped_ckpt, first = stopped_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(stopped_ckpt, ckpt)
    full = train(tmp_path, "full", 2, "--steps", str(STEPS))
    # The second half saves asynchronously: its checkpoints must hold the same state too.
    second = train(tmp_path, "second", 2, "--steps", str(STEPS), "--ckpt", str(ckpt),
                   "--save-at", "12", str(STEPS), "--async-save")

    expected = torch.load(full / "final.pt", weights_only=True)
    resumed = torch.load(second / "final.pt", weights_only=True)
    for key, value in expected["model"].items():
        assert torch.equal(resumed["model"][key], value), f"{key} differs after resume"
    for index, buffers in expected["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][index]["momentum_buffer"],
                           buffers["momentum_buffer"])
    assert resumed["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    for rank in (0, 1):  # every rank took the same batches at the same steps
        assert seen(first, rank) + seen(second, rank) == seen(full, rank)
    assert seen(second, 0)[0][:2] == [STOP + 1, 1]

    written = ckpt / f"step-{STEPS:08d}"
    assert verify(written).ok
    manifest = json.loads((written / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == STEPS
    # The async-written weights are the final weights, and load into a bare module with plain torch.
    bare = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1))
    bare.load_state_dict(torch.load(written / "model.pt", weights_only=True))
    for key, value in expected["model"].items():
        assert torch.equal(bare.state_dict()[key], value)
    rng = torch.load(written / "rng.pt", weights_only=True)
    assert rng["world_size"] == 2 and len(rng["ranks"]) == 2
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])


@pytest.mark.timeout(200)
def test_resume_on_fewer_ranks_takes_exactly_the_remaining_samples(
    stopped_run: tuple[Path, Path], tmp_path: Path
) -> None:
    stopped_ckpt, first = stopped_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(stopped_ckpt, ckpt)
    length, per_step = 96, 8
    remaining_steps = (length - (STOP - 6) * 2 * per_step) // per_step  # the rest of epoch 1
    alone = train(tmp_path, "alone", 1, "--steps", str(STOP + remaining_steps), "--ckpt", str(ckpt))

    order = global_order(length, epoch=1, seed=7, shuffle=True)
    before = [i for rank in (0, 1) for _, epoch, idx in seen(first, rank) if epoch == 1 for i in idx]
    after = [i for _, epoch, idx in seen(alone, 0) for i in idx]
    assert seen(alone, 0)[0][:2] == [STOP + 1, 1]
    assert sorted(before) == sorted(order[: len(before)])  # the 2 ranks took a prefix ...
    assert after == order[len(before):]  # ... and one rank takes the rest, in order, once each
    assert sorted(before + after) == list(range(length))


def _errors_and_rng_on_two_ranks(ctx: Context, tmp: str) -> dict[str, object]:
    """Rank 0's write failures reach every rank; each rank gets its own RNG state back."""
    from distrain import ddp
    from distrain.ckpt import Checkpointer, CheckpointError

    torch.manual_seed(10 + ctx.rank)
    model = nn.Linear(4, 4)
    sync_root, async_root = Path(tmp, "sync"), Path(tmp, "async")
    sync, background = Checkpointer(sync_root, ctx), Checkpointer(async_root, ctx, async_save=True)
    ddp.barrier()
    if ctx.is_main:  # the roots stop being directories: every write under them fails
        sync_root.rmdir()
        sync_root.write_text("")
        async_root.rmdir()
        async_root.write_text("")
    errors: list[str] = []
    try:
        sync.save(1, model=model)
    except CheckpointError as error:
        errors.append(str(error))
    background.save(1, model=model)  # returns: the failure happens in rank 0's thread
    try:
        background.save(2, model=model)
    except CheckpointError as error:
        errors.append(str(error))
    if ctx.is_main:
        sync_root.unlink()
        sync_root.mkdir()
    sync.save(2, model=model)
    expected = torch.rand(3)  # what this rank draws right after the save
    torch.manual_seed(999)
    step = sync.load_latest(model=model)
    return {"errors": errors, "step": step, "draw": expected.tolist(),
            "restored": torch.equal(torch.rand(3), expected)}


@pytest.mark.timeout(120)
def test_rank0_write_errors_reach_every_rank_and_each_rank_gets_its_rng(tmp_path: Path) -> None:
    results = spawn_multi_process(2, "gloo", _errors_and_rng_on_two_ranks, str(tmp_path))
    for rank, result in results.items():
        sync_error, async_error = result["errors"]  # type: ignore[misc]
        assert "could not write checkpoint step 1" in sync_error and "Not a directory" in sync_error
        assert "background checkpoint write failed" in async_error
        if rank == 1:
            assert sync_error.startswith("rank 0 could not save checkpoint step 1: ")
        assert result["step"] == 2 and result["restored"] is True
    assert results[0]["draw"] != results[1]["draw"]
