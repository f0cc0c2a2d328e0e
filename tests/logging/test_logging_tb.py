"""TBLogger: rank-0 event files read back with TensorBoard's own reader; real 2-rank gloo runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util
from torch import nn

from distrain import ddp
from distrain.ddp import Context
from distrain.errors import ConfigError, LaunchFailedError
from distrain.logging import (
    StepTimer,
    TBLogger,
    eval_scalars,
    grad_norm,
    train_scalars,
)
from distrain.logging import metrics as m
from tests.helpers import PYTHON, child_env, kill_group, spawn_multi_process
from tests.helpers.tb import points, read

STANDARD_TAGS = {m.LOSS, m.LR, m.EPOCH, m.GRAD_NORM, m.SAMPLES_PER_S, m.STEP_TIME, m.DATA_WAIT,
                 m.RSS, m.EVAL_ACCURACY, m.EVAL_LOSS}
LR = 0.05


def context(rank: int) -> Context:
    return Context(rank=rank, local_rank=rank, world_size=2, local_world_size=2, node_rank=0,
                   device=torch.device("cpu"), backend=None, is_main=rank == 0)


def event_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if "tfevents" in p.name)


# ------------------------------------------------------------------ one process


def test_flush_makes_every_point_visible_at_once(tmp_path: Path) -> None:
    # tensorboardX's own flush() leaves queued points behind; ours must not.
    with TBLogger(tmp_path, context(0), flush_secs=600) as tb:
        for step in range(1, 6):
            tb.scalar("x", step * 1.5, step)
        tb.flush()
        assert points(read(tmp_path), "x") == [(s, s * 1.5) for s in range(1, 6)]


def test_points_reach_disk_on_the_interval_without_flush(tmp_path: Path) -> None:
    with TBLogger(tmp_path, context(0), flush_secs=0.2) as tb:
        tb.scalars({"a": 1.0, "b": torch.tensor(2.0)}, 7)
        deadline = time.monotonic() + 20
        seen: list[tuple[int, float]] = []
        while time.monotonic() < deadline and not seen:
            acc = read(tmp_path)
            seen = points(acc, "b") if "b" in acc.Tags()["scalars"] else []
        assert seen == [(7, 2.0)]


def test_other_ranks_create_nothing_and_accept_every_call(tmp_path: Path) -> None:
    target = tmp_path / "tb"
    with TBLogger(target, context(1)) as tb:
        tb.scalar("x", 1.0, 1)
        tb.scalars({"y": 2.0}, 1)
        tb.text("t", "hello")
        tb.config({"lr": 0.1})
        tb.histogram("h", torch.randn(10), 1)
        tb.hparams({"lr": 0.1}, {"hparam/acc": 1.0})
        assert tb.graph(nn.Linear(2, 2), torch.randn(1, 2)) is False
        tb.flush()
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_text_config_histogram_graph_hparams_read_back(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).train()
    running_mean = model[1].running_mean.clone()
    with TBLogger(tmp_path, context(0)) as tb:
        tb.config({"lr": 0.1, "model": {"depth": 2}, "out": None})
        tb.histogram("weights", model[0].weight, 3)
        assert tb.graph(model, torch.randn(4, 4)) is True
        tb.hparams({"lr": 0.1, "device": torch.device("cpu")}, {"hparam/accuracy": 0.75}, step=3)
    assert model.training and torch.equal(model[1].running_mean, running_mean)
    acc = read(tmp_path)
    text = tensor_util.make_ndarray(acc.Tensors("config/text_summary")[0].tensor_proto)
    assert "| model.depth | `2` |" in text.item().decode()
    assert acc.Histograms("weights")[0].step == 3
    assert any(node.op for node in acc.Graph().node)
    session = read(tmp_path / "hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        session.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["lr"].number_value == 0.1
    assert start.session_start_info.hparams["device"].string_value == "cpu"
    assert points(session, "hparam/accuracy") == [(3, 0.75)]


def test_purge_step_drops_the_old_tail_within_the_same_second(tmp_path: Path) -> None:
    with TBLogger(tmp_path, context(0)) as tb:
        tb.scalars({"x": 0.0}, 0)
        for step in range(1, 11):
            tb.scalar("x", step, step)
    with TBLogger(tmp_path, context(0), purge_step=6) as tb:  # no sleep: file names must differ
        for step in range(6, 13):
            tb.scalar("x", step * 10, step)
    assert len(event_files(tmp_path)) == 2
    assert points(read(tmp_path), "x") == (
        [(s, float(s)) for s in range(0, 6)] + [(s, s * 10.0) for s in range(6, 13)])


@pytest.mark.parametrize("kwargs", [{"flush_secs": 0}, {"purge_step": -1}, {"purge_step": 1.5}])
def test_bad_arguments_raise_config_error(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="expected"):
        TBLogger(tmp_path, context(0), **kwargs)
    assert not any(tmp_path.iterdir())


@pytest.mark.timeout(60)
def test_sigterm_flushes_before_the_process_dies(tmp_path: Path) -> None:
    # Before the test's SIGTERM, a forked child (think DataLoader worker) is SIGTERM'd too: it
    # holds a copy of the unflushed points and must not write them a second time.
    script = (
        "import os, signal, sys, threading\n"
        "from distrain.ddp import init\n"
        "from distrain.logging import TBLogger\n"
        "tb = TBLogger(sys.argv[1], init(), flush_secs=600)\n"
        "for s in range(1, 4): tb.scalar('x', s, s)\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os._exit(3)\n"
        "_, status = os.waitpid(child, 0)\n"
        "print('ready', os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, flush=True)\n"
        "threading.Event().wait()\n"
    )
    proc = subprocess.Popen([PYTHON, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env=child_env(), start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["ready", str(int(signal.SIGTERM))]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM  # still dies of SIGTERM
    finally:
        kill_group(proc.pid)
        proc.communicate()
    assert points(read(tmp_path), "x") == [(1, 1.0), (2, 2.0), (3, 3.0)]


# ------------------------------------------------------------------ two real ranks


def _train_two_ranks(ctx: Context, base: str, steps: int) -> dict[str, Any]:
    root = Path(base)
    torch.manual_seed(0)
    model = ddp.wrap(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(100 + ctx.rank)  # each rank its own data and loss
    data = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(steps)]
    # The same shared directory on both ranks (the normal case) and one of each rank's own.
    tb = TBLogger(root / "tb", ctx, flush_secs=600)
    with TBLogger(root / f"own-rank{ctx.rank}", ctx) as own:
        own.scalar("x", 1.0, 0)
        own.text("t", "x")
        own.histogram("h", torch.randn(5), 0)
        own.hparams({"a": 1}, {"hparam/b": 2.0})
        own.graph(model, data[0][0])
    config = {"lr": LR, "steps": steps, "world_size": ctx.world_size}
    tb.config(config)
    timer = StepTimer(ctx)
    losses, norms = [], []
    for step, (x, y) in enumerate(timer.wrap(data), 1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        norm = grad_norm(model)
        optimizer.step()
        timer.lap(samples=len(x))
        tb.scalars(train_scalars(ctx, loss=loss, lr=LR, epoch=0, grad_norm=norm,
                                 stats=timer.window()), step)
        losses.append(loss.item())
        norms.append(norm)
    with torch.no_grad():
        x, y = data[0]
        logits = model(x)
        correct = int((logits.argmax(1) == y).sum())
        loss_sum = float(F.cross_entropy(logits, y, reduction="sum"))
    evaluation = eval_scalars(ctx, correct=correct, count=len(y), loss_sum=loss_sum)
    tb.scalars(evaluation, steps)
    tb.hparams(config, {"hparam/accuracy": evaluation[m.EVAL_ACCURACY]})
    # No tb.close(): with flush_secs=600 the points reach disk through ddp.cleanup / exit.
    return {"losses": losses, "norms": norms, "correct": correct, "count": len(y),
            "loss_sum": loss_sum, "pid": os.getpid()}


@pytest.mark.timeout(120)
def test_two_rank_run_logs_the_mean_over_ranks_from_rank_0_only(tmp_path: Path) -> None:
    steps = 6
    out = spawn_multi_process(2, "gloo", _train_two_ranks, str(tmp_path), steps)
    r0, r1 = out[0], out[1]
    files = event_files(tmp_path)
    assert not (tmp_path / "own-rank1").exists()
    assert files and all(p.name.endswith(f".{r0['pid']}") for p in files), files
    assert {p.parent.relative_to(tmp_path).as_posix() for p in files} == {
        "tb", "tb/hparams", "own-rank0", "own-rank0/hparams"}

    acc = read(tmp_path / "tb")
    assert set(acc.Tags()["scalars"]) >= STANDARD_TAGS
    logged = points(acc, m.LOSS)
    assert [s for s, _ in logged] == list(range(1, steps + 1))
    for (_, value), a, b in zip(logged, r0["losses"], r1["losses"]):
        assert value == pytest.approx((a + b) / 2, rel=1e-6)
    assert any(abs(a - b) > 1e-3 for a, b in zip(r0["losses"], r1["losses"]))
    for (_, value), a, b in zip(points(acc, m.GRAD_NORM), r0["norms"], r1["norms"]):
        assert value == pytest.approx(a, rel=1e-5) == pytest.approx(b, rel=1e-5)
    accuracy = (r0["correct"] + r1["correct"]) / (r0["count"] + r1["count"])
    assert points(acc, m.EVAL_ACCURACY) == [(steps, pytest.approx(accuracy))]
    eval_loss = (r0["loss_sum"] + r1["loss_sum"]) / (r0["count"] + r1["count"])
    assert points(acc, m.EVAL_LOSS) == [(steps, pytest.approx(eval_loss, rel=1e-6))]
    assert all(v == pytest.approx(LR) for _, v in points(acc, m.LR))
    assert all(v == 0.0 for _, v in points(acc, m.EPOCH))
    assert all(v > 10 for _, v in points(acc, m.RSS))  # MiB: a torch process is far bigger
    assert all(v > 0 for _, v in points(acc, m.SAMPLES_PER_S))
    assert all(v > 0 for _, v in points(acc, m.STEP_TIME))
    assert all(0 <= v <= 1 for _, v in points(acc, m.DATA_WAIT))
    text = tensor_util.make_ndarray(acc.Tensors("config/text_summary")[0].tensor_proto)
    assert "| world_size | `2` |" in text.item().decode()
    assert points(read(tmp_path / "tb" / "hparams"), "hparam/accuracy") == [
        (0, pytest.approx(accuracy))]
    own = read(tmp_path / "own-rank0")
    assert own.Histograms("h") and any(node.op for node in own.Graph().node)


def _fail_on_rank_1(ctx: Context, base: str) -> None:
    import torch.distributed as dist

    tb = TBLogger(Path(base), ctx, flush_secs=600)
    for step in range(1, 4):
        tb.scalars(train_scalars(ctx, loss=float(ctx.rank + step), lr=LR, epoch=0,
                                 memory=False), step)
    if ctx.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 is waiting on its peer when the peer fails


@pytest.mark.timeout(120)
def test_a_failing_run_keeps_the_points_logged_before_the_failure(tmp_path: Path) -> None:
    with pytest.raises(LaunchFailedError, match=r"rank 1 .*failed"):
        spawn_multi_process(2, "gloo", _fail_on_rank_1, str(tmp_path))
    assert points(read(tmp_path), m.LOSS) == [(1, 1.5), (2, 2.5), (3, 3.5)]

