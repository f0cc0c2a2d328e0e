"""Every example runs, for real: ``distrain launch`` with 2 processes (or plain python), tiny settings.

The digits example runs with its defaults and must reach 0.95 test accuracy. The plain torchrun
script (no distrain import) must print the same numbers under ``torchrun``, ``distrain launch``
and ``distrain launch --launcher ray``. ``make demo`` (examples/demo.py) runs with fewer epochs:
a worker is SIGKILLed, the group restarts once and resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PYTHON, REPO, assert_ok, distrain, run_cmd, torchrun

EXAMPLES = REPO / "examples"


def example(name: str) -> str:
    return str(EXAMPLES / name)


def newest_extra(ckpt_dir: Path) -> dict[str, Any]:
    """The ``extra`` a script saved with its newest checkpoint (the one ``latest`` names)."""
    latest = (ckpt_dir / "latest").read_text().strip()
    extra: dict[str, Any] = json.loads((ckpt_dir / latest / "extra.json").read_text())["extra"]
    return extra


def launch2(*args: str, timeout: float = 150) -> str:
    """``distrain launch --nproc-per-node 2 ARGS``; returns stdout + stderr after checking rc 0."""
    result = distrain("launch", "--nproc-per-node", "2", *args, timeout=timeout)
    assert_ok(result)
    return result.stdout + result.stderr


@pytest.mark.timeout(200)
def test_digits_with_its_defaults_reaches_095_with_checkpoints_and_logs(tmp_path: Path) -> None:
    output = launch2(example("digits_ddp.py"), "--run-dir", str(tmp_path), timeout=180)
    extra = newest_extra(tmp_path / "ckpt")
    assert extra["epoch"] == 7, extra  # the default 8 epochs ran
    assert extra["eval/accuracy"] >= 0.95, f"digits reached only {extra['eval/accuracy']}\n{output[-2000:]}"
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert "[rank0]:epoch 7: step 184" in output


@pytest.mark.timeout(150)
def test_logging_tour_prints_progress_summary_and_writes_scalars(tmp_path: Path) -> None:
    output = launch2(example("digits_logging.py"), "--run-dir", str(tmp_path), "--epochs", "1", timeout=140)
    assert "[rank0]:epoch 0: step 23, eval/accuracy" in output, output[-2000:]
    assert re.search(r"\[rank0\]:done: 23 steps in [\d.]+s", output), output[-2000:]
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"


@pytest.mark.timeout(150)
def test_cifar10_tutorial_net_trains_on_fakedata(tmp_path: Path) -> None:
    output = launch2("--preload", "torchvision", example("cifar10_net.py"), "--fake-size", "64",
                     "--epochs", "1", "--print-every", "4")
    losses = [float(v) for v in re.findall(r"\[1,\s+\d+\] loss: ([\d.]+)", output)]
    assert len(losses) == 2 and all(0 < loss < 5 for loss in losses), output[-2000:]  # 8 batches/rank
    assert "Finished Training. Accuracy of the network on the test images:" in output


@pytest.mark.timeout(180)
def test_resnet18_trains_a_step_per_rank_and_checkpoints(tmp_path: Path) -> None:
    output = launch2("--preload", "torchvision", example("resnet18_cifar.py"), "--fake-size", "32",
                     "--batch-size", "8", "--epochs", "1", "--run-dir", str(tmp_path), timeout=170)
    assert re.search(r"epoch 0: step 2, train loss [\d.]+, test accuracy [\d.]+, .*amp off", output), \
        output[-2000:]
    assert (tmp_path / "ckpt" / "step-00000002" / "scaler.pt").exists()


@pytest.mark.timeout(120)
def test_custom_dataset_is_sharded_and_learns(tmp_path: Path) -> None:
    output = launch2(example("custom_dataset.py"), "--epochs", "10", "--size", "600")
    match = re.search(r"held-out accuracy ([\d.]+) \(600 samples, 2 ranks, 6 steps per epoch\)", output)
    assert match, output[-2000:]  # 600 samples / (2 ranks x 50) = 6 steps: each rank got its half
    assert float(match.group(1)) > 0.6


@pytest.mark.timeout(120)
def test_dataparallel_single_process_falls_back_to_plain_on_cpu() -> None:
    result = run_cmd([PYTHON, example("dataparallel_single_node.py"), "--epochs", "1"], timeout=110)
    assert_ok(result)
    output = result.stdout + result.stderr
    assert "0 GPU(s) visible -> DigitsNet (plain module: no GPU to split over)" in output
    assert "DataParallel asked for but no GPU is visible" in output
    accuracy = float(re.search(r"test accuracy ([\d.]+) with DigitsNet", output).group(1))  # type: ignore[union-attr]
    assert accuracy > 0.5


PLAIN_ARGS = ("--epochs", "2", "--samples", "512")


def numbers(output: str) -> list[str]:
    """The script's own lines (loss per epoch, accuracy), without launcher prefixes."""
    lines = [re.sub(r"^\[rank\d+\]:", "", line) for line in output.splitlines()]
    return [line for line in lines if line.startswith(("epoch ", "accuracy "))]


@pytest.fixture(scope="module")
def plain_under_torchrun() -> list[str]:
    result = torchrun("--nproc-per-node", "2", example("plain_torchrun_script.py"), *PLAIN_ARGS)
    assert_ok(result)
    found = numbers(result.stdout + result.stderr)
    assert len(found) == 3 and found[-1].startswith("accuracy ") and "on 2 ranks" in found[-1], found
    return found


@pytest.mark.timeout(150)
def test_plain_torchrun_script_runs_unchanged_under_distrain_launch(plain_under_torchrun: list[str]) -> None:
    output = launch2(example("plain_torchrun_script.py"), *PLAIN_ARGS)
    assert numbers(output) == plain_under_torchrun


@pytest.mark.ray
@pytest.mark.timeout(200)
def test_plain_torchrun_script_runs_unchanged_under_the_ray_launcher(plain_under_torchrun: list[str]) -> None:
    result = distrain("launch", "--launcher", "ray", "--num-workers", "2",
                      example("plain_torchrun_script.py"), *PLAIN_ARGS, timeout=180)
    assert_ok(result)
    assert numbers(result.stdout + result.stderr) == plain_under_torchrun


@pytest.mark.timeout(200)
def test_cifar10_steplr_per_epoch_resumes_exactly(tmp_path: Path) -> None:
    args = ("--preload", "torchvision", example("cifar10_net.py"), "--fake-size", "64", "--print-every", "4")
    straight = launch2(*args, "--epochs", "2")
    first = launch2(*args, "--epochs", "1", "--run-dir", str(tmp_path))
    resumed = launch2(*args, "--epochs", "2", "--run-dir", str(tmp_path))
    epochs = re.findall(r"epoch (\d) lr ([\d.e-]+) last loss ([\d.]+)", straight)
    assert [e[:2] for e in epochs] == [("1", "0.001"), ("2", "0.0005")], straight[-2000:]  # StepLR
    assert re.findall(r"epoch (\d) lr ([\d.e-]+) last loss ([\d.]+)", first) == epochs[:1]
    assert "resumed after epoch 1, lr 0.0005" in resumed, resumed[-2000:]
    assert re.findall(r"epoch (\d) lr ([\d.e-]+) last loss ([\d.]+)", resumed) == epochs[1:]


@pytest.mark.timeout(150)
def test_tabular_regression_with_missing_values_learns_on_two_ranks(tmp_path: Path) -> None:
    output = launch2(example("tabular_regression.py"), "--out-dir", str(tmp_path), "--epochs", "20")
    assert "inputs ['NumRooms', 'Alley_Grvl', 'Alley_Pave', 'Alley_nan']" in output, output[-2000:]
    match = re.search(r"epoch 20: train RMSE ([\d,]+) \(price std ([\d,]+), 2 ranks, 16 steps", output)
    assert match, output[-2000:]  # 2000 rows / (2 ranks x 64) = 16 steps: each rank its half
    rmse, std = (float(g.replace(",", "")) for g in match.groups())
    assert rmse < 0.6 * std
    assert (tmp_path / "house.csv").read_text().count("NA") > 100  # the table had holes


@pytest.mark.timeout(240)
def test_make_demo_kills_a_worker_and_the_restarted_group_resumes_and_finishes(tmp_path: Path) -> None:
    # What `make demo` runs, with 6 epochs instead of 8: the kill comes after 2 checkpoints.
    result = run_cmd([PYTHON, example("demo.py"), "--run-dir", str(tmp_path), "--epochs", "6"], timeout=220)
    assert_ok(result)
    output = result.stdout + result.stderr
    assert "killing worker pid" in output and "finished after a crash and an automatic restart" in output, \
        output[-3000:]
    attempts = sorted(p.name for p in (tmp_path / "logs").glob("*/attempt_*"))
    assert attempts == ["attempt_0", "attempt_1"], attempts  # one restart
    restarted = next((tmp_path / "logs").glob("*/attempt_1/0/stdout.log")).read_text()
    # the restarted group resumed from a checkpoint: it never trained epoch 0 again, and finished
    assert "epoch 0:" not in restarted and "epoch 5: step 138" in restarted, restarted
    extra = newest_extra(tmp_path / "ckpt")
    assert extra["epoch"] == 5 and extra["eval/accuracy"] > 0.9, extra
    assert f"final test accuracy  {extra['eval/accuracy']:.4f}" in output
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
