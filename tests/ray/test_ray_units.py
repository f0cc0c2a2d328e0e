"""The Ray launcher's pure parts: flags, rank layout, capacity, shipping plan, console rules.

No Ray cluster here (the launcher itself is tested end to end in test_ray_launch.py).
"""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import pytest

from distrain import cli
from distrain.errors import ConfigError
from distrain.launch import LaunchConfig, RankFailure, RayOptions
from distrain.launch_cli import config_from_args, parse_launch_args
from distrain.launchers.ray import check_ray_config, function_payload
from distrain.launchers.ray_group import RayRankFailure, assign_ranks
from distrain.launchers.ray_output import on_console
from distrain.launchers.ray_session import (
    Target,
    _is_loopback,
    capacity,
    catch_signals,
    choose_size,
    forwarded_env,
    plan_command,
)
from distrain.std_spec import std_value
from tests.helpers import REPO

SCRIPTS = REPO / "tests" / "scripts"
SCRIPT = str(SCRIPTS / "ray_behave.py")
CLUSTER = Target(address="10.0.0.1:6379", joined=False)
EMBEDDED = Target(address=None, joined=False)


def _config(*argv: str) -> LaunchConfig:
    return config_from_args(parse_launch_args(["--launcher", "ray", *argv], environ={}))


# --- flags ------------------------------------------------------------------------------------


def test_num_workers_fixed_and_elastic() -> None:
    fixed = _config("--num-workers", "4", SCRIPT)
    assert (fixed.min_nodes, fixed.max_nodes, fixed.nproc_per_node, fixed.world_size) == (1, 1, 4, 4)
    elastic = _config("--num-workers", "2:4", SCRIPT)
    assert (elastic.min_nodes, elastic.max_nodes, elastic.nproc_per_node) == (2, 4, 1)


def test_nnodes_needs_no_rendezvous_flags_with_ray() -> None:
    config = _config("--nnodes", "2", "--nproc-per-node", "2", SCRIPT)
    assert config.world_size == 4 and config.master_port is None
    elastic = _config("--nnodes", "1:3", "--nproc-per-node", "2", SCRIPT)
    assert (elastic.min_nodes, elastic.max_nodes, elastic.world_size) == (1, 3, 6)


@pytest.mark.parametrize(("argv", "names"), [
    (["--num-workers", "4:2"], "--num-workers='4:2'"),
    (["--num-workers", "x"], "--num-workers='x'"),
    (["--num-workers", "1:2:3"], "--num-workers='1:2:3'"),
    (["--launcher", "local", "--num-workers", "2:4"], "MIN:MAX only with --launcher ray"),
])
def test_bad_worker_counts_are_one_line_exit_2(argv: list[str], names: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    launcher = [] if "--launcher" in argv else ["--launcher", "ray"]
    assert cli.main(["launch", *launcher, *argv, SCRIPT]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err and "Traceback" not in err


def test_ray_only_checks() -> None:
    with pytest.raises(ConfigError, match="--cpus-per-worker/--gpus-per-worker"):
        check_ray_config(_config("--cpus-per-worker", "0", SCRIPT))
    with pytest.raises(ConfigError, match="join_timeout"):
        check_ray_config(_config("--rdzv-conf", "join_timeout=soon", SCRIPT))
    assert check_ray_config(_config("--rdzv-conf", "join_timeout=12", SCRIPT)) == 12.0
    assert check_ray_config(_config(SCRIPT)) == 600.0


def test_function_payload_carries_the_call_and_sys_path() -> None:
    assert function_payload(_config(SCRIPT)) is None
    payload = function_payload(LaunchConfig(entrypoint=pow, args=(2, 5), launcher="ray"))
    assert payload is not None
    path, call = pickle.loads(payload)
    fn, args = pickle.loads(call)
    assert isinstance(path, list) and fn(*args) == 32
    with pytest.raises(ConfigError, match="picklable"):
        function_payload(LaunchConfig(entrypoint=lambda: 1, launcher="ray"))


# --- rank layout, capacity, elastic size --------------------------------------------------------


def test_ranks_are_numbered_node_by_node_in_order_of_first_bundle() -> None:
    infos = [{"node_id": n, "ip": f"10.0.0.{n[-1]}", "gpu_ids": []}
             for n in ("nodeB", "nodeA", "nodeB", "nodeA", "nodeC")]
    placed = assign_ranks(infos)
    assert [index for index, _ in placed] == [0, 2, 1, 3, 4]
    places = [place for _, place in placed]
    assert [p.rank for p in places] == [0, 1, 2, 3, 4]
    assert [(p.node_index, p.local_rank, p.local_world_size) for p in places] == [
        (0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2), (2, 0, 1)]
    assert places[0].node == "10.0.0.B (Ray node nodeB)"


def _node(cpu: float, gpu: float = 0.0, alive: bool = True) -> dict[str, object]:
    return {"Alive": alive, "Resources": {"CPU": cpu, "GPU": gpu}}


def test_capacity_by_strategy_and_resources() -> None:
    nodes = [_node(4), _node(2), _node(8, alive=False)]
    assert capacity(nodes, RayOptions(cpus_per_worker=1)) == 6
    assert capacity(nodes, RayOptions(cpus_per_worker=1.5)) == 3
    assert capacity(nodes, RayOptions(placement_strategy="STRICT_PACK")) == 4
    assert capacity(nodes, RayOptions(placement_strategy="STRICT_SPREAD")) == 2
    gpu_nodes = [_node(16, 2), _node(16, 0)]
    assert capacity(gpu_nodes, RayOptions(cpus_per_worker=1, gpus_per_worker=1)) == 2
    assert capacity(gpu_nodes, RayOptions(cpus_per_worker=0, gpus_per_worker=0.5)) == 4
    assert capacity([], RayOptions()) == 0


def test_elastic_size_is_the_most_that_fits_in_steps_of_nproc() -> None:
    workers = _config("--num-workers", "2:4", SCRIPT)
    assert [choose_size(workers, n) for n in (0, 2, 3, 4, 9)] == [2, 2, 3, 4, 4]
    nodes = _config("--nnodes", "1:3", "--nproc-per-node", "2", SCRIPT)
    assert [choose_size(nodes, n) for n in (1, 3, 4, 5, 7)] == [2, 2, 4, 4, 6]


# --- what runs where ----------------------------------------------------------------------------


def test_local_ray_runs_the_script_in_place_with_the_drivers_environment() -> None:
    plan = plan_command(_config(SCRIPT, "env", "x"), EMBEDDED)
    assert plan.argv == (str(Path(SCRIPT).resolve()), "env", "x") and plan.python
    assert not plan.inherit_env and plan.runtime_env == {}
    assert plan.base_env == dict(os.environ) and plan.cwd == os.getcwd()


def test_a_cluster_gets_the_script_directory_and_distrain_through_runtime_env(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("HOME_GROWN_SECRET", "not shipped")
    plan = plan_command(_config(SCRIPT, "env", "x"), CLUSTER)
    assert plan.argv == ("ray_behave.py", "env", "x") and plan.cwd is None and plan.inherit_env
    env = plan.runtime_env
    assert env["working_dir"] == str(SCRIPTS)
    assert env["py_modules"] == [str(REPO / "distrain")]
    assert env["env_vars"]["NCCL_DEBUG"] == "INFO" and "HOME_GROWN_SECRET" not in env["env_vars"]
    assert ".venv" in env["excludes"]
    module = plan_command(_config("--working-dir", str(REPO), "-m", "json.tool"), CLUSTER)
    assert module.argv == ("-m", "json.tool") and module.runtime_env["working_dir"] == str(REPO)
    joined = plan_command(_config(SCRIPT), Target(address=None, joined=True))
    assert joined.runtime_env == {} and joined.inherit_env and joined.base_env == {}


def test_a_script_outside_the_working_dir_is_refused() -> None:
    with pytest.raises(ConfigError, match="inside"):
        plan_command(_config("--working-dir", str(REPO / "distrain"), SCRIPT), CLUSTER)
    with pytest.raises(ConfigError, match="--working-dir"):
        plan_command(_config("--working-dir", "/no/such/dir", SCRIPT), CLUSTER)


def test_forwarded_env_and_loopback_detection() -> None:
    assert forwarded_env({"TORCH_LOGS": "x", "PATH": "/bin", "PYTHONHASHSEED": "0"}) == {
        "TORCH_LOGS": "x", "PYTHONHASHSEED": "0"}
    assert _is_loopback("127.0.0.1:6379") and _is_loopback("localhost:1")
    assert not _is_loopback("ray://127.0.0.1:10001") and not _is_loopback("auto")
    assert not _is_loopback("10.1.2.3:6379") and not _is_loopback(None)


# --- output, failures, signals -------------------------------------------------------------------


def test_console_rules_follow_torchrun() -> None:
    assert std_value("3", 5) == 3 and std_value("0:1,1:2", 1) == 2 and std_value("0:1", 1) == 0
    plain = _config("--nproc-per-node", "2", SCRIPT)
    assert on_console(plain, 1, "stdout") and on_console(plain, 1, "stderr")
    redirected = _config("--nproc-per-node", "2", "--redirects", "3", "--tee", "2", SCRIPT)
    assert not on_console(redirected, 0, "stdout") and on_console(redirected, 0, "stderr")
    filtered = _config("--nproc-per-node", "2", "--local-ranks-filter", "0", SCRIPT)
    assert on_console(filtered, 0, "stdout") and not on_console(filtered, 1, "stderr")


def test_failure_descriptions() -> None:
    died = RayRankFailure(rank=2, local_rank=0, exitcode=-9, signal=None,
                          node="10.0.0.2 (Ray node abcd1234)", log_tail="last words",
                          reason="its Ray node 10.0.0.2 (Ray node abcd1234) died")
    text = died.describe()
    assert text.startswith("rank 2 (local rank 0 on 10.0.0.2 (Ray node abcd1234)) failed: its Ray")
    assert "last words" in text and isinstance(died, RankFailure)
    start = RayRankFailure(rank=-1, local_rank=-1, exitcode=1, signal=None, node="-",
                           log_tail="", reason="timed out after 5s waiting for 4 workers")
    assert start.describe() == "the workers could not start: timed out after 5s waiting for 4 workers"
    plain = RayRankFailure(rank=0, local_rank=0, exitcode=3, signal=None, node="n", log_tail="")
    assert plain.describe() == RankFailure.describe(plain)


def test_signals_are_recorded_not_fatal_and_handlers_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with catch_signals() as request:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        assert request.name == "SIGTERM" and request.count == 2
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_cluster_that_cannot_be_joined_gets_a_fix_in_one_line() -> None:
    from distrain.launchers.ray_session import connect_fix

    def chained(outer: str, inner: str) -> BaseException:
        try:
            try:
                raise RuntimeError(inner)
            except RuntimeError as cause:
                raise ConnectionError(outer) from cause
        except ConnectionError as error:
            return error

    # What Ray 2.60 raises when `ray start` made the head require a token and the driver has none.
    token = chained("Failed to connect to Ray cluster at 127.0.0.1:44419",
                    "Failed to connect to GCS. Unauthenticated: RPC error: InvalidAuthToken: "
                    "Authentication token is missing or incorrect")
    assert "RAY_AUTH_MODE=token" in connect_fix(token)
    down = chained("Failed to connect to Ray cluster at 127.0.0.1:1", "Timed out while waiting for GCS")
    fix = connect_fix(down)
    assert "ray status" in fix and "RAY_AUTH_MODE" not in fix
    assert "\n" not in fix and "\n" not in connect_fix(token)
