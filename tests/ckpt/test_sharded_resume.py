"""Sharded checkpoints across real launches: exact resume, resharding 4 -> 2 and 2 -> 4, DDP <-> FSDP.

Three launches (tests/helpers/sharded_train.py is the training code), run once for the module:

* A, 2 ranks, FSDP: 8 steps, asynchronous sharded saves at 2, 4, 6, 8 (keep_last=2, keep_every=4);
* 4 ranks, FSDP: C trains 4 steps and saves (sync); E resumes from A's step 4 (2 -> 4), trains
  to 8 and saves a *full* checkpoint (sharded=False: gathered to rank 0);
* 2 ranks: B resumes from A's step 4 (FSDP, same world: must be bit-identical to A); D resumes from
  C's step 4 (4 -> 2); F resumes a DDP model from A's sharded step 4 and saves a full checkpoint;
  G resumes an FSDP model from F's full checkpoint.

The global batch is the same on 2 and 4 ranks, so every run computes A's steps up to the order of
floating-point sums: a resharded run must match A within 1e-5, take exactly the samples A took at
each step, and load exactly the state that was saved.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from distrain.ckpt import verify
from distrain.ckpt.cli import main
from distrain.ckpt.dcp_io import read_object
from distrain.ckpt.store import CheckpointStore
from tests.helpers import REPO, assert_ok, distrain, spawn_multi_process
from tests.helpers.sharded_train import Net, run_phases

Runs = dict[str, Any]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    tmp = tmp_path_factory.mktemp("sharded")
    roots = {name: tmp / name for name in ("a", "b", "c", "e", "f")}
    a = spawn_multi_process(2, "gloo", run_phases, [
        {"strategy": "fsdp", "steps": 8, "save": str(roots["a"]), "save_at": [2, 4, 6, 8], "async": True,
         "keep_last": 2, "keep_every": 4, "capture_at": [4, 6]}])
    shutil.copytree(roots["a"] / "step-00000004", roots["b"] / "step-00000004")  # A stopped at 4
    four = spawn_multi_process(4, "gloo", run_phases, [
        {"strategy": "fsdp", "steps": 4, "save": str(roots["c"]), "save_at": [4], "capture_at": [4]},
        {"strategy": "fsdp", "load": str(roots["b"]), "steps": 8, "save": str(roots["e"]), "save_at": [8],
         "sharded": False}])
    two = spawn_multi_process(2, "gloo", run_phases, [
        {"strategy": "fsdp", "load": str(roots["b"]), "steps": 8},
        {"strategy": "fsdp", "load": str(roots["c"]), "steps": 8},
        {"strategy": "ddp", "load": str(roots["b"]), "steps": 8, "save": str(roots["f"]), "save_at": [8]},
        {"strategy": "fsdp", "load": str(roots["f"]), "steps": 8},
        {"errors": True, "root": str(tmp / "errors")}])

    def by_phase(results: dict[int, list[dict[str, Any]]], index: int) -> dict[int, dict[str, Any]]:
        return {rank: phases[index] for rank, phases in results.items()}

    return {"roots": roots, "tmp": tmp, "A": by_phase(a, 0), "C": by_phase(four, 0), "E": by_phase(four, 1),
            "B": by_phase(two, 0), "D": by_phase(two, 1), "F": by_phase(two, 2), "G": by_phase(two, 3),
            "errors": by_phase(two, 4)}


def same(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical nested states."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length"
        for index, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def close(a: Mapping[str, Any], b: Mapping[str, Any], atol: float = 1e-5) -> None:
    """Model weights and optimizer moments equal up to the order of floating-point sums."""
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=atol, msg=key)
    for fqn, moments in a["optimizer"]["state"].items():
        for name, value in moments.items():
            torch.testing.assert_close(b["optimizer"]["state"][fqn][name], value, rtol=0, atol=atol)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def global_seen(run: dict[int, dict[str, Any]]) -> dict[int, tuple[int, list[int]]]:
    """Per step: (epoch, every sample the ranks took together, sorted)."""
    out: dict[int, tuple[int, list[int]]] = {}
    for result in run.values():
        for step, epoch, indices in result["seen"]:
            previous = out.get(step, (epoch, []))
            assert previous[0] == epoch
            out[step] = (epoch, sorted(previous[1] + indices))
    return out


@pytest.mark.timeout(300)
def test_same_world_resume_is_bit_identical(runs: Runs) -> None:
    a, b = runs["A"], runs["B"]
    assert b[0]["loaded"] == 4
    same(a[0]["final"], b[0]["final"], "final")  # model and optimizer, after 4 + stop + 4 steps
    for rank in (0, 1):
        assert b[rank]["seen"] == a[rank]["seen"][4:], f"rank {rank} took other samples"
        assert b[rank]["draws"]["loaded-4"] == a[rank]["draws"]["saved-4"], f"rank {rank} RNG"
    assert a[0]["draws"]["saved-4"] != a[1]["draws"]["saved-4"]  # each rank has its own streams


def test_async_saves_retention_and_layout(runs: Runs) -> None:
    root, a = runs["roots"]["a"], runs["A"]
    store = CheckpointStore(root)
    assert [step for step, _ in store.checkpoints()] == [4, 6, 8]  # keep_last=2 plus keep_every=4
    assert store.latest_name() == "step-00000008"
    for step, path in store.checkpoints():
        assert verify(path).ok
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["kind"] == "sharded" and manifest["world_size"] == 2 and manifest["step"] == step
        assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng.pt", "extra.json", "scheduler.pt",
                "loader.pt"} == set(manifest["files"])
        assert manifest["objects"]["model"]["class"] == "tests.helpers.sharded_train.Net"
    # Training went on while they were written: each holds the state of its own step.
    same(a[0]["states"]["6"]["model"], read_object(root / "step-00000006", _manifest(root, 6), "model"))
    same(a[0]["final"]["model"], read_object(root / "step-00000008", _manifest(root, 8), "model"))
    saved_optimizer = read_object(root / "step-00000008", _manifest(root, 8), "optimizer")
    same(a[0]["final"]["optimizer"], saved_optimizer)


def _manifest(root: Path, step: int) -> dict[str, Any]:
    return json.loads((root / f"step-{step:08d}" / "manifest.json").read_text())


def test_reshard_4_to_2_loads_exactly_and_continues_with_the_remaining_samples(runs: Runs) -> None:
    a, c, d = runs["A"], runs["C"], runs["D"]
    assert _manifest(runs["roots"]["c"], 4)["world_size"] == 4
    assert len([n for n in _manifest(runs["roots"]["c"], 4)["files"] if n.endswith(".distcp")]) == 4
    assert d[0]["loaded"] == 4
    same(c[0]["states"]["4"], d[0]["states"]["loaded-4"], "resharded state")
    seen_a, seen_c, seen_d = global_seen(a), global_seen(c), global_seen(d)
    assert sorted(seen_c) == [1, 2, 3, 4] and sorted(seen_d) == [5, 6, 7, 8]
    assert {**seen_c, **seen_d} == seen_a  # step by step the same global batches: nothing skipped
    assert seen_d[5][0] == 0 and seen_d[7][0] == 1  # the rest of epoch 0, then epoch 1
    close(a[0]["final"], d[0]["final"])  # an uninterrupted 2-rank run from the same state
    for rank in (0, 1):  # ranks 0 and 1 continue the streams saved by ranks 0 and 1 of 4
        assert d[rank]["draws"]["loaded-4"] == c[rank]["draws"]["saved-4"]


def test_reshard_2_to_4_and_a_full_checkpoint_gathered_from_fsdp(runs: Runs) -> None:
    a, e = runs["A"], runs["E"]
    same(a[0]["states"]["4"], e[0]["states"]["loaded-4"], "resharded state")
    seen_a, seen_e = global_seen(a), global_seen(e)
    assert {step: seen_e[step] for step in (5, 6, 7, 8)} == {step: seen_a[step] for step in (5, 6, 7, 8)}
    close(a[0]["final"], e[0]["final"])
    # sharded=False under FSDP: rank 0 gathered a full checkpoint, plain files in torch's formats.
    path = runs["roots"]["e"] / "step-00000008"
    assert verify(path).ok and _manifest(runs["roots"]["e"], 8)["kind"] == "full"
    bare = Net()
    bare.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    same(e[0]["final"]["model"], bare.state_dict())
    saved = torch.load(path / "optimizer.pt", weights_only=True)  # torch.optim's format: by position
    names = [name for name, _ in bare.named_parameters()]
    assert [group["params"] for group in saved["param_groups"]] == [list(range(len(names)))]
    for index, name in enumerate(names):
        same(e[0]["final"]["optimizer"]["state"][name], saved["state"][index], name)


def test_sharded_checkpoint_resumes_ddp_and_full_checkpoint_resumes_fsdp(runs: Runs) -> None:
    a, f, g = runs["A"], runs["F"], runs["G"]
    same(a[0]["states"]["4"], f[0]["states"]["loaded-4"], "sharded -> DDP")
    assert global_seen(f) == {step: global_seen(a)[step] for step in (5, 6, 7, 8)}
    close(a[0]["final"], f[0]["final"])
    assert _manifest(runs["roots"]["f"], 8)["kind"] == "full"  # DDP writes the rank-0 kind
    assert g[0]["loaded"] == 8
    same(f[0]["final"], g[0]["states"]["loaded-8"], "full (DDP) -> FSDP")
    for rank in (0, 1):
        assert g[rank]["draws"]["loaded-8"] == f[rank]["draws"]["saved-8"]


def test_write_errors_reach_every_rank_and_sharded_true_works_for_ddp(runs: Runs) -> None:
    for rank, result in runs["errors"].items():
        (error,) = result["errors"]
        assert "could not write checkpoint step 1" in error and "Not a directory" in error
        if rank == 1:
            assert error.startswith("rank 0 could not save checkpoint step 1: ")
        assert result["step"] == 2 and result["restored"] is True
    root = runs["tmp"] / "errors"
    assert [s for s, _ in CheckpointStore(root).checkpoints()] == [2]
    assert _manifest(root, 2)["kind"] == "sharded"


def test_consolidate_and_the_cli_on_sharded_checkpoints(runs: Runs, capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    root, out = runs["roots"]["a"], runs["tmp"] / "model.pt"
    result = distrain("ckpt", "consolidate", str(root), "--out", str(out), timeout=60)
    assert result.returncode == 0, result.stderr
    bare = Net()
    bare.load_state_dict(torch.load(out, weights_only=True))  # a plain state dict, no DTensor
    same(runs["A"][0]["final"]["model"], bare.state_dict())

    assert main(["inspect", str(root)]) == 0
    text = capsys.readouterr().out
    assert "kind: sharded" in text and "shards: 2 (__0_0.distcp, __1_0.distcp)" in text
    assert "model: module tests.helpers.sharded_train.Net (shards)" in text
    assert re.search(r"layers\.0\.lin\.weight +16x16 float32 +2 pieces", text)
    assert re.search(r"head\.weight +1x16 float32 +2 pieces", text)
    assert "scheduler: state_dict torch.optim.lr_scheduler.StepLR (scheduler.pt)" in text
    assert main(["ls", str(runs["roots"]["c"])]) == 0
    assert " sharded  4      yes" in capsys.readouterr().out
    assert main(["verify", str(root)]) == 0
    assert capsys.readouterr().out.count("OK ") == 3
    exported = runs["tmp"] / "exported.pt"
    assert main(["export", str(root / "step-00000006"), "--out", str(exported)]) == 0
    same(runs["A"][0]["states"]["6"]["model"], torch.load(exported, weights_only=True))
    assert main(["consolidate", str(root), "--out", str(exported), "--name", "optimizer"]) == 2
    assert "--name='optimizer': expected one of the saved modules (model)" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_the_fsdp_example_resumes_when_started_again(tmp_path: Path) -> None:
    script = str(REPO / "examples" / "fsdp_sharded.py")
    first = distrain("launch", "--nproc-per-node", "2", script, "--run-dir", str(tmp_path), "--epochs", "2",
                     "--max-steps", "30", timeout=150)
    assert_ok(first)
    assert "[rank0]:epoch 1: step 30," in first.stdout + first.stderr  # stopped inside epoch 1
    again = distrain("launch", "--nproc-per-node", "2", script, "--run-dir", str(tmp_path), "--epochs", "2",
                     timeout=150)
    assert_ok(again)
    output = again.stdout + again.stderr
    assert "resumed from step 30 (epoch 1, saved on 2 ranks, now 2)" in output
    assert "[rank0]:epoch 1: step 46," in output  # the rest of epoch 1: 23 steps per epoch in all
    manifest = _manifest(tmp_path / "ckpt", 46)
    assert manifest["kind"] == "sharded" and {"__0_0.distcp", "__1_0.distcp"} <= set(manifest["files"])
