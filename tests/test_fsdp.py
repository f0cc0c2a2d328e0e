"""FSDP2 through ddp.wrap(strategy="fsdp"): block choice (pure) and equivalence with DDP on real gloo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrain import ddp
from distrain.errors import ConfigError
from distrain.fsdp import choose_blocks
from tests.helpers import spawn_multi_process
from tests.helpers.sharded_train import Block, Net


def test_block_choice() -> None:
    net = Net()
    assert choose_blocks(net) == list(net.layers)  # default: the ModuleList's children
    assert choose_blocks(net, blocks=["Block"]) == list(net.layers)
    assert choose_blocks(net, blocks=[Block]) == list(net.layers)
    assert choose_blocks(net, rule=lambda m: m is net.head) == [net.head]
    sized = choose_blocks(net, min_block_params=16 * 16)
    assert all(_count(m) >= 256 for m in sized) and net.layers[0].lin in sized
    with pytest.raises(ConfigError, match="blocks='Transformer'"):
        choose_blocks(net, blocks=["Transformer"])
    with pytest.raises(ConfigError, match="at least one matching"):
        choose_blocks(net, rule=lambda m: False)
    with pytest.raises(ConfigError, match="min_block_params=0"):
        choose_blocks(net, min_block_params=0)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _train(ctx: ddp.Context, strategy: str, steps: int = 4) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.manual_seed(0)
    model = ddp.wrap(Net(), ctx, strategy=strategy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1 + ctx.rank)
    for _ in range(steps):
        x, y = torch.randn(8, 8, generator=generator), torch.randn(8, 1, generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        norm = ddp.clip_grad_norm(model, 1e9)
        assert norm.ndim == 0
        optimizer.step()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}


def _both(ctx: ddp.Context) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    result = _train(ctx, "ddp"), _train(ctx, "fsdp")
    ddp.cleanup()
    return result


@pytest.mark.timeout(180)
def test_fsdp_matches_ddp_on_two_ranks() -> None:
    results = spawn_multi_process(2, "gloo", _both)
    ddp_state, fsdp_state = results[0]
    assert ddp_state.keys() == fsdp_state.keys()
    for key in ddp_state:
        torch.testing.assert_close(fsdp_state[key], ddp_state[key], rtol=0, atol=1e-5)
    assert results[1][1] == {}  # cpu_offload gathers the full state on rank 0 only


def _wrap_errors(ctx: ddp.Context) -> list[str]:
    errors = []
    for kwargs in ({"blocks": ["Nope"]}, {"mixed_precision": "fp8"}, {"bogus": 1}):
        try:
            ddp.wrap(Net(), ctx, strategy="fsdp", **kwargs)
        except ConfigError as error:
            errors.append(str(error))
    ddp.cleanup()
    return errors


@pytest.mark.timeout(120)
def test_bad_fsdp_choices_are_clear_errors() -> None:
    errors = spawn_multi_process(2, "gloo", _wrap_errors)[0]
    assert len(errors) == 3
    assert "blocks='Nope'" in errors[0] and "mixed_precision='fp8'" in errors[1] and "bogus" in errors[2]
