"""Start-up checks, the lost-host name and the recovery settings, without processes (the
multi-host runs are in test_nodes_elastic.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distrain.launch_config import LaunchConfig
from distrain.launchers.node_watch import silent_after, watched
from distrain.launchers.recovery import NODE_LOST_AFTER_S, c10d_recovery_conf, restart_preload
from distrain.preflight import endpoint_problem, main, store_problem
from distrain.results import lost_peer
from tests.helpers import free_port


def test_a_writable_directory_passes_and_leaves_nothing(tmp_path: Path) -> None:
    assert store_problem(str(tmp_path / "ckpt")) is None
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_an_unwritable_store_is_one_line_with_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    problem = store_problem(str(blocker / "ckpt"))
    assert problem is not None and "\n" not in problem
    assert problem.startswith(f"cannot write the checkpoint store {blocker / 'ckpt'} (")
    assert "fix: give this host the store's credentials" in problem


def test_an_unreachable_endpoint_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    problem = endpoint_problem(endpoint, timeout=5)
    assert problem is not None and f"cannot reach the rendezvous endpoint {endpoint}" in problem
    assert endpoint_problem("nohostport") == ("rendezvous endpoint 'nohostport' is not HOST:PORT; "
                                              "fix: e.g. --rdzv-endpoint node0:29400")
    assert main(["--rdzv-endpoint", endpoint, "--timeout", "5"]) == 2
    assert "cannot reach the rendezvous endpoint" in capsys.readouterr().err


def test_a_peer_on_this_machine_is_not_named_as_a_lost_host() -> None:
    text = ("RuntimeError: [gloo/transport/tcp/pair.cc:545] Read error [{}]:40102: "
            "Connection reset by peer. This is typically caused by a remote worker hanging")
    assert lost_peer("Traceback ...\n" + text.format("127.0.0.1")) is None  # a local rank
    assert lost_peer("ValueError: bad input") is None


def test_recovery_defaults_yield_to_the_user() -> None:
    conf = c10d_recovery_conf({"last_call_timeout": "30"})
    assert conf == {"keep_alive_interval": 1, "keep_alive_max_attempt": 4, "last_call_timeout": "30"}


def test_a_silent_node_counts_as_lost_one_heartbeat_after_torch_drops_it() -> None:
    assert NODE_LOST_AFTER_S == 4 and silent_after({}) == 8
    assert silent_after({"keep_alive_interval": "5", "keep_alive_max_attempt": "3"}) == 20
    assert watched("c10d", "host0:29400", 2, {}) and not watched("c10d", "host0:29400", 1, {})
    assert not watched("static", "host0:29400", 2, {})
    assert not watched("c10d", "/tmp/rdzv", 2, {"store_type": "file"})


def test_a_job_that_may_restart_preloads_the_s3_client_when_a_store_url_is_an_argument() -> None:
    def preload(*args: str, restarts: int = 1) -> list[str]:
        return list(restart_preload(LaunchConfig(entrypoint="train.py", args=args, max_restarts=restarts)))

    assert preload("--ckpt", "s3://bucket/run") == ["auto", "torch._dynamo", "s3fs"]
    assert preload("--ckpt=s3://bucket/run") == ["auto", "torch._dynamo", "s3fs"]
    assert preload("--ckpt", "runs/x") == ["auto", "torch._dynamo"]
    assert preload("--ckpt", "s3://bucket/run", restarts=0) == ["auto"]
