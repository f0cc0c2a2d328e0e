"""``distrain launch --launcher ray`` on a real 2-node Ray cluster bound to 127.0.0.1.

One ``ray.cluster_utils.Cluster`` (head + one worker node, 2 CPUs each, dashboard off, Ray's
files in a private temp dir) serves the whole module; the node-removal tests run last and put
the node back. Each test checks afterwards that no actor, rank or launcher process is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

# Read when Ray is imported: the cluster then binds the loopback (see pitfalls.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch

from distrain.affinity import AFFINITY_ENV
from distrain.env import CONTRACT_KEYS
from distrain.launchers.watchdog import WATCH_ENV_KEYS
from distrain.orphans import ENV_KEYS as ORPHAN_ENV_KEYS
from tests.helpers import PYTHON, REPO, assert_ok, child_env, distrain, ray_harness
from tests.helpers.ray_harness import (
    Launcher,
    LoopbackCluster,
    local_two_nodes,
)

pytestmark = pytest.mark.ray
SCRIPTS = REPO / "tests" / "scripts"
TRAIN = str(SCRIPTS / "ray_train.py")
BEHAVE = str(SCRIPTS / "ray_behave.py")
# Differ by design between runs (fresh port, run id, temp path) or are compared differently.
VOLATILE = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE", "MASTER_ADDR"}


# ----------------------------------------------------------------------------------------------
# The cluster, and the leak check that knows which processes are the cluster's own
# ----------------------------------------------------------------------------------------------


# The loopback cluster (one per module) and the leak check that knows its processes.
cluster = ray_harness.cluster
no_leaks = ray_harness.no_leaks

# ----------------------------------------------------------------------------------------------
# Running the launcher
# ----------------------------------------------------------------------------------------------


def ray_launch(cluster: LoopbackCluster, *args: str, timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
    return distrain("launch", "--launcher", "ray", "--address", cluster.address, *args,
                    timeout=timeout)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "weights.pt", weights_only=True)


def _info(out: Path) -> dict[str, Any]:
    return json.loads((out / "info.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The same training with no launcher at all (a world of one): the weights to reach."""
    out = tmp_path_factory.mktemp("reference")
    result = subprocess.run([PYTHON, TRAIN, "--out", str(out)], capture_output=True, text=True,
                            env=child_env(), timeout=120, check=False)
    assert_ok(result)
    return _weights(out)


def _assert_close(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(ours[name], expected[name], rtol=0, atol=1e-5), name


# ----------------------------------------------------------------------------------------------
# Parity with the local launcher: weights and environment (4 ranks, 2 nodes x 2)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parity(cluster: LoopbackCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same training run under both launchers, 4 ranks as 2 nodes x 2: outputs, envs."""
    runs: dict[str, Any] = {}
    for name in ("ray", "local"):
        out = tmp_path_factory.mktemp(name)
        args = (TRAIN, "--out", str(out), "--env-out", str(out), "--lr", "0.1")
        if name == "ray":
            result = ray_launch(cluster, "--nnodes", "2", "--nproc-per-node", "2", *args,
                                timeout=170)
            assert_ok(result)
            runs["ray_stdout"] = result.stdout
        else:
            local_two_nodes(*args)
        envs = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in out.glob("env-*.json")}
        runs[name] = {"out": out, "env": envs}
    return runs


@pytest.mark.timeout(300)
def test_four_ranks_on_two_nodes_train_to_the_local_launchers_weights(
        parity: dict[str, Any], reference: dict[str, torch.Tensor]) -> None:
    ray_out, local_out = parity["ray"]["out"], parity["local"]["out"]
    assert "[rank0]:step 6 loss" in parity["ray_stdout"]
    assert _info(ray_out)["world_size"] == _info(local_out)["world_size"] == 4
    ray_weights, local_weights = _weights(ray_out), _weights(local_out)
    for name, value in local_weights.items():
        assert torch.equal(ray_weights[name], value), f"{name} differs from the local launcher"
    _assert_close(ray_weights, reference)


@pytest.mark.timeout(300)
def test_environment_matches_the_local_launcher_key_by_key(parity: dict[str, Any]) -> None:
    ray_envs, local_envs = parity["ray"]["env"], parity["local"]["env"]
    assert sorted(ray_envs) == sorted(local_envs) == [0, 1, 2, 3]
    parent = child_env()
    for rank in range(4):
        ours, theirs = ray_envs[rank], local_envs[rank]
        # Every variable the local launcher adds, and the whole contract, with the same value;
        # not the CPUs the local launcher shares out among its ranks (Ray places its actors).
        # Nor the launcher watch's (a Ray worker dies with its actor: PR_SET_PDEATHSIG=SIGKILL).
        assert AFFINITY_ENV in theirs and AFFINITY_ENV not in ours
        assert set(theirs) >= ORPHAN_ENV_KEYS and not ORPHAN_ENV_KEYS & set(ours)
        added = {k for k, v in theirs.items() if parent.get(k) != v and not k.startswith("__")}
        added -= {"_", "SHLVL", AFFINITY_ENV} | WATCH_ENV_KEYS | ORPHAN_ENV_KEYS
        for key in sorted(added | set(CONTRACT_KEYS) | {"CUDA_VISIBLE_DEVICES"}):
            assert (key in ours) == (key in theirs), f"rank {rank}: {key} present in one only"
            if key in theirs and key not in VOLATILE:
                assert ours[key] == theirs[key], f"rank {rank} {key}: {ours[key]} != {theirs[key]}"
        assert socket.gethostbyname(ours["MASTER_ADDR"]) == socket.gethostbyname(theirs["MASTER_ADDR"])
        for env, name in ((ours, "ray"), (theirs, "local")):
            argv = json.loads(env["__argv__"])
            assert argv == ["--out", str(parity[name]["out"]), "--env-out",
                            str(parity[name]["out"]), "--lr", "0.1"]
            assert env["__name__"] == "__main__"
        stray = {k for k in ours if k.startswith("TORCHELASTIC_")} - set(theirs)
        assert not stray, f"rank {rank}: variables the local launcher does not set: {stray}"
    assert {e["GROUP_WORLD_SIZE"] for e in ray_envs.values()} == {"2"}  # really two Ray nodes
    assert [e["GROUP_RANK"] for _, e in sorted(ray_envs.items())] == ["0", "0", "1", "1"]
    assert {e["LOCAL_WORLD_SIZE"] for e in ray_envs.values()} == {"2"}
    assert {e["MASTER_ADDR"] for e in ray_envs.values()} == {"127.0.0.1"}
    assert len({e["MASTER_PORT"] for e in ray_envs.values()}) == 1


# ----------------------------------------------------------------------------------------------
# Python API, output, failures, signals
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_python_api_run_returns_each_ranks_value(
        cluster: LoopbackCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from distrain.launch import run
    from tests.scripts.ray_fns import rank_report

    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    before = signal.getsignal(signal.SIGTERM)
    values = run(rank_report, "hello", nproc=2, launcher="ray")
    assert signal.getsignal(signal.SIGTERM) is before  # Ray's driver handler is not left behind
    assert sorted(values) == [0, 1]
    for rank, value in values.items():
        assert value["rank"] == rank and value["world_size"] == 2 and value["tag"] == "hello"
        assert value["mean_rank"] == 0.5 and value["restart"] == "0"
        assert value["pid"] != os.getpid()


@pytest.mark.timeout(120)
def test_a_failing_rank_stops_the_group_and_is_named_with_its_node_and_error(
        cluster: LoopbackCluster, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    result = ray_launch(cluster, "--num-workers", "2", "--log-dir", str(logs), "--rdzv-id", "job7",
                        BEHAVE, "raise")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[rank1]:rank 1 started" in result.stdout
    assert "[rank1]:ValueError: boom from rank 1" in result.stderr
    summary = result.stderr[result.stderr.index("distrain: the job failed"):]
    assert "1 rank(s)" in summary, summary  # rank 0 was stopped, not failed
    assert "rank 1 (local rank 1 on 127.0.0.1 (Ray node " in summary
    assert "exit code 1" in summary and "ValueError: boom from rank 1" in summary
    stderr_log = logs / "job7" / "attempt_0" / "1" / "stderr.log"
    assert "ValueError: boom from rank 1" in stderr_log.read_text()
    assert "rank 1 started" in (logs / "job7" / "attempt_0" / "1" / "stdout.log").read_text()
    assert (logs / "job7" / "attempt_0" / "0" / "stderr.log").is_file()


@pytest.mark.timeout(90)
def test_the_gloo_teardown_abort_is_recognised_and_still_a_failure(
        cluster: LoopbackCluster) -> None:
    result = ray_launch(cluster, "--num-workers", "1", BEHAVE, "abort")
    assert result.returncode == 1
    assert "[rank0]:training done" in result.stdout
    assert "killed by SIGABRT" in result.stderr
    assert "This is the gloo teardown abort" in result.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("sig", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_reaches_the_ranks_then_the_grace_period_ends_in_sigkill(
        cluster: LoopbackCluster, sig: signal.Signals, exit_code: int) -> None:
    grace = 3.0
    launcher = Launcher(cluster, "--num-workers", "2", "--term-timeout", str(grace), BEHAVE, "term")
    launcher.wait_for("]:ready", 2, timeout=90)
    sent = time.monotonic()
    launcher.proc.send_signal(sig)  # Ctrl-C or kill: to the launcher, which forwards it
    code = launcher.finish(timeout=60)
    elapsed = time.monotonic() - sent
    assert code == exit_code, launcher.text()
    assert f"[rank0]:got {sig.name}, saving and exiting" in "".join(launcher.out)
    assert f"stopped by {sig.name}" in "".join(launcher.err)
    assert grace <= elapsed < grace + 20, elapsed  # rank 1 ignored it: killed after the grace


# ----------------------------------------------------------------------------------------------
# Restarts: a killed worker, a lost node
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_sigkilled_worker_restarts_the_group_which_resumes_from_its_snapshot_and_completes(
        cluster: LoopbackCluster, reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    # No durable checkpoint before the kill: step 3 can only come from the in-memory snapshots.
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    result = ray_launch(cluster, "--num-workers", "2", "--max-restarts", "1", TRAIN,
                        "--out", str(out), "--ckpt", str(ckpt), "--die-at", "3", "--die-rank", "1",
                        "--snapshot-every", "1", "--save-every", "100", timeout=170)
    assert_ok(result)
    assert "killed by SIGKILL" in result.stderr and "restarting the group" in result.stderr
    assert "[rank0]:resumed from step 3 with world size 2" in result.stdout
    assert _info(out) == {"world_size": 2, "attempt": 1, "resumed_from": 3, "steps": 6}
    assert not list(ckpt.glob("step-*")), "a durable checkpoint was written"
    _assert_close(_weights(out), reference)


@pytest.mark.timeout(150)
def test_a_lost_node_fails_a_fixed_size_job_within_30s_naming_the_node(
        cluster: LoopbackCluster) -> None:
    launcher = Launcher(cluster, "--num-workers", "4", BEHAVE, "hold")
    try:
        launcher.wait_for("]:holding", 4, timeout=120)
        removed = time.monotonic()
        cluster.remove_worker_node()
        code = launcher.finish(timeout=30)
        elapsed = time.monotonic() - removed
    finally:
        cluster.restore()
    err = "".join(launcher.err)
    assert code == 1, launcher.text()
    assert elapsed < 30
    assert "its Ray node 127.0.0.1 (Ray node " in err and "died" in err, err


@pytest.mark.timeout(200)
def test_a_lost_node_restarts_elastically_on_the_rest_and_completes(
        cluster: LoopbackCluster, reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    launcher = Launcher(cluster, "--num-workers", "2:4", "--max-restarts", "1", TRAIN,
                        "--out", str(out), "--ckpt", str(ckpt), "--hold-at", "2")
    try:
        launcher.wait_for("]:holding at step 2", 4, timeout=120)
        cluster.remove_worker_node()
        code = launcher.finish(timeout=150)
    finally:
        cluster.restore()
    assert code == 0, launcher.text()
    err = "".join(launcher.err)
    assert "attempt 0: 4 workers" in err and "attempt 1: 2 workers" in err, err
    assert "[rank0]:resumed from step 2 with world size 2" in "".join(launcher.out)
    assert _info(out) == {"world_size": 2, "attempt": 1, "resumed_from": 2, "steps": 6}
    _assert_close(_weights(out), reference)
