"""Crash during save: SIGKILL a real writer at random instants; never a partial checkpoint.

The writer is forked from this process (torch already imported), so each of the trials costs a
fraction of a second instead of a fresh interpreter.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from distrain.ckpt import Checkpointer
from distrain.ckpt.store import CheckpointStore, verify
from tests.helpers import kill_forked_at
from tests.helpers.ckpt import CTX


def _save_forever(root: Path, ready: int) -> None:
    """The forked writer: saves steps 1, 2, 3, ... (weights = step) until killed."""
    # As DataLoader workers do: OpenMP's thread pool does not survive fork; one thread is safe.
    torch.set_num_threads(1)
    store = CheckpointStore(root)
    step = max((s for s, _ in store.checkpoints()), default=0) + 1
    model = nn.Linear(256, 256)  # 257 KB per checkpoint: a save is many write calls
    ckpt = Checkpointer(root, CTX, keep_last=2)
    os.write(ready, b"r")
    while True:
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.bias.fill_(float(step))
        ckpt.save(step, model=model, extra={"step": step})
        step += 1


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_at_random_points_of_a_save_never_leaves_a_partial_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(20261123)
    trials, interrupted_writes = 24, 0
    # One save here first, so the forked writers inherit warm code paths and save at full speed.
    Checkpointer(tmp_path / "warm-up", CTX).save(1, model=nn.Linear(256, 256))
    root = tmp_path / "ckpt"
    for trial in range(trials):
        kill_forked_at(lambda ready: _save_forever(root, ready), rng.uniform(0.0, 0.25), f"trial {trial}")
        interrupted_writes += any(p.name.startswith(".tmp-") for p in root.iterdir())
        store = CheckpointStore(root)
        found = store.checkpoints()
        for _, path in found:  # anything that looks like a checkpoint is a complete one
            assert verify(path).ok, f"trial {trial}: {verify(path).problems}"
        if store.latest_name() is not None:
            assert (root / store.latest_name()).is_dir()
        model = nn.Linear(256, 256)
        loader = Checkpointer(root, CTX)
        step = loader.load_latest(model=model)
        if found:
            assert step == found[-1][0]
            assert torch.all(model.weight == step) and loader.values == {"extra": {"step": step}}
    assert interrupted_writes > 0, "no kill landed inside a write: the test proves nothing"
    assert CheckpointStore(root).checkpoints(), "no save ever completed"
