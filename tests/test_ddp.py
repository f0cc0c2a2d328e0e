"""distrain.ddp: the decision logic (pure), init under every launcher, DDP equivalence on real gloo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from distrain import ddp
from distrain.errors import ConfigError
from distrain.wrapping import choose_strategy
from tests.helpers import REPO, assert_ok, distrain, spawn_multi_process, torchrun

# ---------------------------------------------------------------------------- pure decisions


@pytest.mark.parametrize(
    ("gpus", "procs", "expected"),
    [
        (0, 1, "none"), (0, 4, "ddp"),
        (1, 1, "none"), (1, 4, "ddp"),
        (4, 1, "dp"), (4, 4, "ddp"),
    ],
)
def test_auto_strategy_table(gpus: int, procs: int, expected: str) -> None:
    chosen, reason = choose_strategy("auto", world_size=procs, visible_gpus=gpus, has_process_group=procs > 1)
    assert chosen == expected and reason


def test_forced_strategies() -> None:
    assert choose_strategy("ddp", world_size=1, visible_gpus=0, has_process_group=True)[0] == "ddp"
    assert choose_strategy("none", world_size=4, visible_gpus=4, has_process_group=True)[0] == "none"
    assert choose_strategy("dp", world_size=1, visible_gpus=4, has_process_group=False)[0] == "dp"
    assert choose_strategy("dp", world_size=1, visible_gpus=0, has_process_group=False)[0] == "none"
    with pytest.raises(ConfigError, match="strategy='ddp'"):
        choose_strategy("ddp", world_size=1, visible_gpus=0, has_process_group=False)
    with pytest.raises(ConfigError, match="strategy='zero3'"):
        choose_strategy("zero3", world_size=2, visible_gpus=0, has_process_group=True)


def test_backend_and_device_resolution() -> None:
    assert ddp.resolve_backend("auto", cuda_available=True) == "nccl"
    assert ddp.resolve_backend("auto", cuda_available=False) == "gloo"
    assert ddp.resolve_backend("GLOO", cuda_available=True) == "gloo"
    assert ddp.resolve_backend("cpu:gloo,cuda:nccl", cuda_available=True) == "cpu:gloo,cuda:nccl"
    with pytest.raises(ConfigError, match="backend='ncl'"):
        ddp.resolve_backend("ncl", cuda_available=True)
    with pytest.raises(ConfigError, match=r"backend='nccl'.*gloo"):
        ddp.resolve_backend("nccl", cuda_available=False)
    assert ddp.resolve_device(3, cuda_device_count=0) == torch.device("cpu")
    assert ddp.resolve_device(3, cuda_device_count=1) == torch.device("cuda", 0)  # narrowed per worker
    assert ddp.resolve_device(3, cuda_device_count=4) == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match="LOCAL_RANK=5"):
        ddp.resolve_device(5, cuda_device_count=4)


# ---------------------------------------------------------------------------- init


def test_init_without_a_launcher_is_a_world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with ddp.init() as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
        assert ctx.device == torch.device("cpu")
        model = ddp.wrap(nn.Linear(2, 2), ctx)
        assert type(model) is nn.Linear and ddp.unwrap(model) is model
        assert ddp.all_reduce_mean({"loss": 2.0}) == {"loss": 2.0}
    ddp.cleanup()  # twice is fine


def test_init_rejects_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="backend='mpi2'"):
        ddp.init(backend="mpi2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        ddp.init()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        ddp.init()
    with pytest.raises(ConfigError, match="timeout=-1"):
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "1")
        ddp.init(timeout=-1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher", ["torchrun", "distrain"])
def test_init_under_a_launcher(tmp_path: Path, launcher: str) -> None:
    script = str(REPO / "tests" / "scripts" / "ddp_context.py")
    run = torchrun if launcher == "torchrun" else distrain
    prefix = () if launcher == "torchrun" else ("launch",)
    assert_ok(run(*prefix, "--nproc-per-node", "2", script, env={"OUT_DIR": str(tmp_path)}))
    for rank in (0, 1):
        ctx = json.loads((tmp_path / f"ctx-{rank}.json").read_text())
        assert ctx == {"rank": rank, "local_rank": rank, "world_size": 2, "local_world_size": 2,
                       "node_rank": 0, "backend": "gloo", "is_main": rank == 0, "device": "cpu",
                       "rank_sum": 1.0}


# ---------------------------------------------------------------------------- DDP equivalence

STEPS, BATCH, ACCUM = 4, 4, 2


def _data(total: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(total, 6, generator=generator), torch.randn(total, 1, generator=generator)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _train(ctx: ddp.Context, batch: int, accum: int) -> dict[str, torch.Tensor]:
    """``STEPS`` optimizer steps; each step takes ``accum`` micro-batches of ``batch`` per rank."""
    model = ddp.wrap(_model(), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(STEPS * accum * batch * ctx.world_size)
    x, y = x.double(), y.double()
    per_step = accum * batch * ctx.world_size
    for step in range(STEPS):
        for micro in range(accum):
            # rank r takes positions r, r+W, ... of this micro-batch, like DistributedSampler
            start = step * per_step + micro * batch * ctx.world_size
            rows = slice(start + ctx.rank, start + batch * ctx.world_size, ctx.world_size)
            with ddp.accumulate(model, micro, accum):
                loss = nn.functional.mse_loss(model(x[rows]), y[rows]) / accum
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    mean = ddp.all_reduce_mean({"rank": float(ctx.rank)})
    state = {k: v.detach().clone() for k, v in ddp.unwrap(model).state_dict().items()}
    state["mean_rank"] = torch.tensor(mean["rank"])
    ddp.cleanup()
    return state


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accum", [1, ACCUM])
def test_two_ranks_match_one_rank_with_twice_the_batch(accum: int) -> None:
    results = spawn_multi_process(2, "gloo", _train, BATCH, accum)
    one = _train(ddp.Context(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                             device=torch.device("cpu"), backend=None, is_main=True), 2 * BATCH, accum)
    assert results[0]["mean_rank"].item() == 0.5
    for key, value in one.items():
        if key == "mean_rank":
            continue
        torch.testing.assert_close(results[0][key], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(results[1][key], value, rtol=0, atol=1e-6)


def _no_sync_skips_the_all_reduce(ctx: ddp.Context) -> bool:
    model = ddp.wrap(nn.Linear(2, 1, bias=False), ctx)
    with ddp.accumulate(model, 0, 2):  # not the last micro-step: gradients stay local
        model(torch.full((1, 2), float(ctx.rank + 1))).sum().backward()
    local = model.module.weight.grad.clone()
    ddp.cleanup()
    return bool(torch.equal(local, torch.full((1, 2), float(ctx.rank + 1))))


@pytest.mark.timeout(120)
def test_accumulate_uses_no_sync_on_all_but_the_last_micro_step() -> None:
    assert spawn_multi_process(2, "gloo", _no_sync_skips_the_all_reduce) == {0: True, 1: True}


def test_autocast_and_scaler_on_cpu() -> None:
    ctx = ddp.Context(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                      device=torch.device("cpu"), backend=None, is_main=True)
    with ddp.autocast(ctx):
        out = nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    assert not ddp.grad_scaler(ctx).is_enabled()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_cleanup_after_an_exception_neither_hangs_nor_aborts(method: str) -> None:
    result = distrain("launch", "--start-method", method, "--nproc-per-node", "2",
                      str(REPO / "tests" / "scripts" / "cleanup_after_error.py"))
    assert result.returncode == 1
    summary = result.stderr.split("distrain: the job failed", 1)[1]
    assert "rank 1" in summary and "ValueError: rank 1 fails after a step" in summary
    assert "terminate called" not in result.stdout + result.stderr
