"""``distrain ckpt ls | inspect | verify | export`` on real checkpoints.

Most cases call ``distrain.ckpt.cli.main`` in this process (the same code the command runs); one
runs the real ``distrain`` command to check exit codes and one-line errors end to end.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from distrain.ckpt import Checkpointer
from distrain.ckpt.cli import main
from distrain.ddp import Context
from tests.helpers import PYTHON, child_env, distrain
from tests.helpers.ckpt import Payload, rewrite_manifest

CTX = Context(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
              device=torch.device("cpu"), backend=None, is_main=True)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Checkpoints at steps 10 and 20 of a DataParallel-wrapped model, its optimizer and extras."""
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    ckpt = Checkpointer(tmp_path / "ckpt", CTX)
    ckpt.save(10, model=nn.DataParallel(net), optimizer=optimizer, extra={"lr": 0.1})
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ckpt.save(20, model=net, optimizer=optimizer, extra={"lr": 0.05})
    return tmp_path / "ckpt"


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_ls_lists_steps_sizes_validity_and_latest(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip_bit(root / "step-00000010" / "optimizer.pt")
    assert main(["ls", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "time", "size", "kind", "world", "valid"]
    assert lines[1].split()[0] == "10" and "NO: optimizer.pt: xxh3_128 mismatch" in lines[1]
    assert lines[2].split()[:2] == ["*", "20"] and lines[2].endswith("yes")
    assert " KB " in lines[2] and " full " in lines[2]


def test_inspect_shows_metadata_shapes_and_parameter_count(root: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(root)]) == 0  # a root: the newest valid checkpoint
    out = capsys.readouterr().out
    assert out.startswith(f"checkpoint {root / 'step-00000020'}")
    for expected in ("kind: full", "step: 20", "world_size: 1", f"torch: {torch.__version__}",
                     "valid: yes", "parameters: 46 in 4 tensors", "0.weight  4x8 float32",
                     "2.bias    2 float32", "keys: state, param_groups",
                     "state.0.momentum_buffer  4x8 float32", 'value: {"lr": 0.05}'):
        assert expected in out, expected
    assert "module." not in out
    assert main(["inspect", str(root / "step-00000010" / "model.pt")]) == 0
    assert "parameters: 46 in 4 tensors" in capsys.readouterr().out


def test_verify_names_the_corrupt_file_and_exits_1(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(root)]) == 0
    assert capsys.readouterr().out.count("OK ") == 2
    flip_bit(root / "step-00000020" / "model.pt")
    assert main(["verify", str(root / "step-00000020")]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "model.pt: xxh3_128 mismatch" in captured.out
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "OK      " + str(root / "step-00000010") in out and "step-00000020: model.pt" in out


def test_export_writes_bare_weights_for_a_plain_module(root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.pt"
    assert main(["export", str(root / "step-00000010"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    bare = model()  # the weights of step 10, from a checkpoint of a wrapped model
    bare.load_state_dict(torch.load(out, weights_only=True))
    saved = torch.load(root / "step-00000010" / "model.pt", weights_only=True)
    assert all(torch.equal(bare.state_dict()[k], v) for k, v in saved.items())
    flip_bit(root / "step-00000020" / "model.pt")
    assert main(["export", str(root / "step-00000020"), "--out", str(out)]) == 1
    assert main(["export", str(root / "step-00000010"), "--out", str(out), "--name", "nope"]) == 2
    assert "--name='nope': expected one of the saved modules (model)" in capsys.readouterr().err


def test_hostile_checkpoint_is_refused_by_inspect_and_export(root: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PWNED"
    target = root / "step-00000020" / "model.pt"
    torch.save({"0.weight": Payload(marker)}, target)
    rewrite_manifest(target.parent, "model.pt")
    assert main(["inspect", str(target.parent)]) == 1
    assert main(["export", str(target.parent), "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert err.count("refusing to load") == 2 and "would run code" in err
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


def test_the_real_command_exit_codes_and_one_line_errors(root: Path, tmp_path: Path) -> None:
    missing = distrain("ckpt", "verify", str(tmp_path / "nowhere"), timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"distrain ckpt verify: error: {tmp_path / 'nowhere'}: no such file or directory"]
    os.remove(root / "step-00000020" / "manifest.json")  # a checkpoint without its manifest
    partial = distrain("ckpt", "verify", str(root), timeout=60)
    assert partial.returncode == 1 and "manifest.json: missing" in partial.stdout
    assert "Traceback" not in partial.stderr + missing.stderr


def test_ls_stars_what_load_latest_loads_and_inspect_into_head_ends_quietly(root: Path) -> None:
    newest = root / "step-00000020"
    weights = next(p for p in newest.iterdir() if p.name.startswith("model"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")  # same size, wrong hash
    listing = distrain("ckpt", "ls", str(root), timeout=60)
    starred = [line.split()[1] for line in listing.stdout.splitlines() if line.startswith("*")]
    assert starred == ["10"], listing.stdout  # load_latest would skip the corrupt step 20
    piped = subprocess.run(f"'{PYTHON}' -m distrain ckpt inspect '{root / 'step-00000010'}' | head -1",
                           shell=True, capture_output=True, text=True, env=child_env(), timeout=60,
                           executable="/bin/bash", check=False)
    assert piped.stdout.count("\n") == 1 and "Broken pipe" not in piped.stderr, piped.stderr
