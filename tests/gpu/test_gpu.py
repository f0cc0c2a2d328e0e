"""GPU readiness (``make gpu-test``): nccl, device pinning, AMP resume, DataParallel, FSDP, async
checkpoints of CUDA tensors, a fast-start server that never initialises CUDA.

Every check runs in real processes (``distrain launch`` or plain python). Needs only torch with CUDA,
pytest, psutil and tensorboardX: nothing from Ray or moto.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import PYTHON, assert_ok, distrain, run_cmd

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(240)]
SCRIPT = str(Path(__file__).with_name("gpu_script.py"))


def result_of(run: subprocess.CompletedProcess[str]) -> Any:
    assert_ok(run)
    lines = [line.split("RESULT ", 1)[1] for line in run.stdout.splitlines() if "RESULT " in line]
    assert lines, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(lines[-1])


def launch(*args: str, env: dict[str, str] | None = None, nproc: int = 1) -> Any:
    return distrain("launch", "--nproc-per-node", str(nproc), SCRIPT, *args, timeout=200, env=env)


def test_nccl_world_of_one_from_a_forked_worker_that_found_cuda_untouched() -> None:
    got = result_of(launch("nccl"))
    assert got["backend"] == "nccl" and got["device"] == "cuda:0" and got["world"] == 1
    assert got["sum"] == 1.0 and got["mean"] == 2.5
    # The fast-start server (forkserver, the default) must not have initialised CUDA before the fork.
    assert got["initialized"] is False and got["bad_fork"] is False, got


def test_spawned_worker_agrees() -> None:
    got = result_of(distrain("launch", "--start-method", "spawn", "--nproc-per-node", "1", SCRIPT, "nccl",
                             timeout=200))
    assert got["backend"] == "nccl" and got["sum"] == 1.0


def test_device_pinning_follows_local_rank_under_cuda_visible_devices() -> None:
    count = torch.cuda.device_count()
    every = ",".join(str(i) for i in range(count))
    run = launch("pin", env={"CUDA_VISIBLE_DEVICES": every}, nproc=count)
    assert_ok(run)
    pins = [json.loads(line.split("PIN ", 1)[1]) for line in run.stdout.splitlines() if "PIN " in line]
    assert sorted(p["local_rank"] for p in pins) == list(range(count)), run.stdout
    for pin in pins:
        expected = 0 if count == 1 else pin["local_rank"]
        assert pin["device"] == f"cuda:{expected}" and pin["current"] == expected, pin
    # Narrowed to the last GPU only (as Ray does per worker): that GPU is cuda:0 in the worker.
    last = count - 1
    run = launch("pin", env={"CUDA_VISIBLE_DEVICES": str(last)})
    assert_ok(run)
    pin = json.loads(run.stdout.split("PIN ", 1)[1].splitlines()[0])
    assert pin["device"] == "cuda:0" and pin["current"] == 0 and pin["visible"] == str(last)
    assert pin["uuid"] == str(torch.cuda.get_device_properties(last).uuid)


def test_amp_with_grad_scaler_resumes_exactly(tmp_path: Path) -> None:
    straight = result_of(launch("amp", str(tmp_path / "a"), "16", "16"))
    first = result_of(launch("amp", str(tmp_path / "b"), "16", "6"))
    resumed = result_of(launch("amp", str(tmp_path / "b"), "16", "16"))
    assert straight["enabled"] is True and straight["dtype_seen"] == "torch.float32"
    assert first["step"] == 6 and resumed["step"] == 16 == straight["step"]
    # Large inputs make fp16 gradients overflow at first, so the scale moves: restored, not reset.
    assert first["scale"] < 65536.0 and resumed["scale"] == straight["scale"], (first, resumed["scale"])
    assert all(math.isfinite(v) for v in straight["params"])
    assert resumed["params"] == straight["params"]


def test_data_parallel_spans_the_visible_gpus() -> None:
    got = result_of(run_cmd([PYTHON, SCRIPT, "dp"], timeout=200))
    assert got["type"] == "DataParallel", got
    assert got["device_ids"] == list(range(got["count"])) and got["out_device"] == "cuda:0"


def test_fsdp_trains_and_reloads_on_gpu(tmp_path: Path) -> None:
    got = result_of(launch("fsdp", str(tmp_path / "ckpt")))
    assert got["last"] < got["first"] and got["step"] == 20 and got["same"] is True, got
    assert got["param_type"] == "DTensor" and got["param_device"] == "cuda:0"


def test_async_checkpoint_of_cuda_tensors_holds_the_values_at_save(tmp_path: Path) -> None:
    got = result_of(launch("async", str(tmp_path / "ckpt")))
    assert got == {"step": 1, "same": True, "device": "cuda:0"}
