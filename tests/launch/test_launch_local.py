"""``distrain launch``, real processes: torchrun parity, multi-node, ports, failures, signals, logs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distrain.affinity import AFFINITY_ENV, parse_cpus
from distrain.launchers.watchdog import WATCH_ENV_KEYS
from distrain.orphans import ENV_KEYS as ORPHAN_ENV_KEYS
from tests.helpers import (
    PYTHON,
    REPO,
    assert_ok,
    assert_workers_gone,
    child_env,
    distrain,
    free_port,
    kill_group,
    torchrun,
    wait_for_files,
)

SCRIPTS = REPO / "tests" / "scripts"


both_start_methods = pytest.mark.parametrize("start_method", ["spawn", "forkserver"], indirect=True)


@pytest.fixture(autouse=True)
def start_method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The workers' start method: fast start (forked from the preloaded server, the default), and
    fresh interpreters too for the behaviours where the two paths differ (``both_start_methods``).

    ``PET_START_METHOD`` is how torchrun-style flags come from the environment; the real torchrun
    ignores it for scripts (they are always fresh interpreters there).
    """
    method = str(getattr(request, "param", "forkserver"))
    monkeypatch.setenv("PET_START_METHOD", method)
    return method
# Differ from run to run by design (fresh port, run id, temp paths) or belong to the harness.
VOLATILE = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE", "BASE_KEYS", "OUT_DIR", "_"}


def _envs(out: Path) -> dict[int, dict[str, str]]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in out.glob("env-*.json")}


@both_start_methods
@pytest.mark.timeout(120)
def test_environment_matches_real_torchrun(tmp_path: Path) -> None:
    base = ",".join(child_env())
    runs = {}
    for name, runner in (("torchrun", torchrun), ("distrain", distrain)):
        out = tmp_path / name
        out.mkdir()
        args = ("--nproc-per-node", "2", str(SCRIPTS / "dump_env.py"), "--lr", "0.1")
        result = runner(*(("launch",) if name == "distrain" else ()), *args,
                        env={"OUT_DIR": str(out), "BASE_KEYS": base})
        assert_ok(result)
        runs[name] = _envs(out)
    assert sorted(runs["torchrun"]) == sorted(runs["distrain"]) == [0, 1]
    for rank in (0, 1):
        ours, theirs = runs["distrain"][rank], runs["torchrun"][rank]
        own = WATCH_ENV_KEYS | ORPHAN_ENV_KEYS | {AFFINITY_ENV}
        assert set(ours) >= own  # ours alone: the hang watch, the launcher watch, the CPUs
        assert parse_cpus(ours[AFFINITY_ENV]) == os.sched_getaffinity(0)
        ours = {key: value for key, value in ours.items() if key not in own}
        assert set(ours) == set(theirs), f"rank {rank}: keys differ: {set(ours) ^ set(theirs)}"
        for key in set(theirs) - VOLATILE:
            assert ours[key] == theirs[key], f"rank {rank} {key}: {ours[key]!r} != {theirs[key]!r}"
        assert ours["__argv__"] == '["--lr", "0.1"]'
        assert ours["__name__"] == "__main__"
        assert ours["__sys_path0__"] == str(SCRIPTS)
    assert runs["distrain"][0]["OMP_NUM_THREADS"] == "1"
    assert runs["distrain"][1]["MASTER_PORT"] == runs["distrain"][0]["MASTER_PORT"]


def _launch_nodes(tmp_path: Path, node_args: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    procs = [
        subprocess.Popen([PYTHON, "-m", "distrain", "launch", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=child_env({"OUT_DIR": str(tmp_path)}))
        for args in node_args
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            kill_group(proc.pid)
    return results


@pytest.mark.timeout(240)
@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_two_nodes_on_one_machine_form_one_world(tmp_path: Path, rdzv: str) -> None:
    port = free_port()
    script = str(SCRIPTS / "ddp_context.py")
    if rdzv == "static":
        common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                  "--master-port", str(port)]
        nodes = [[*common, "--node-rank", str(n), script] for n in (0, 1)]
    else:
        common = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job42"]
        nodes = [[*common, script] for _ in (0, 1)]
    for result in _launch_nodes(tmp_path, nodes):
        assert_ok(result)
    contexts = [json.loads((tmp_path / f"ctx-{r}.json").read_text()) for r in range(4)]
    assert [c["world_size"] for c in contexts] == [4] * 4
    assert sorted(c["local_rank"] for c in contexts) == [0, 0, 1, 1]
    assert sorted(c["node_rank"] for c in contexts) == [0, 0, 1, 1]
    assert all(c["rank_sum"] == 6.0 for c in contexts)  # 0+1+2+3 through a real all_reduce
    assert all(c["backend"] == "gloo" and c["device"] == "cpu" for c in contexts)


@pytest.mark.timeout(120)
def test_two_jobs_at_once_pick_their_own_ports(tmp_path: Path) -> None:
    jobs = [tmp_path / "a", tmp_path / "b"]
    procs = []
    for out in jobs:
        out.mkdir()
        procs.append(subprocess.Popen(
            [PYTHON, "-m", "distrain", "launch", "--nproc-per-node", "2", str(SCRIPTS / "dump_env.py")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=child_env({"OUT_DIR": str(out)})))
    try:
        codes = [proc.wait(timeout=100) for proc in procs]
    finally:
        for proc in procs:
            kill_group(proc.pid)
            proc.communicate()
    assert codes == [0, 0]
    ports = {_envs(out)[0]["MASTER_PORT"] for out in jobs}
    assert len(ports) == 2


def _failing_run(tmp_path: Path, mode: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return distrain("launch", "--nproc-per-node", "2", *extra, str(SCRIPTS / "behave.py"),
                    env={"OUT_DIR": str(tmp_path), "BEHAVE": mode})


@both_start_methods
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("exit3", ["rank 1", "exit code 3", "rank is giving up with exit code 3"]),
        ("raise", ["rank 1", "exit code 1", "ValueError: boom from the bad rank", "Traceback"]),
        ("sigkill", ["rank 1", "killed by SIGKILL"]),
    ],
)
def test_a_failed_rank_stops_the_job_with_a_summary(tmp_path: Path, mode: str, expected: list[str]) -> None:
    result = _failing_run(tmp_path, mode)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr.split("distrain: the job failed")[0].replace(
        "[rank1]:Traceback", "")  # only the worker's own traceback, never the launcher's
    summary = result.stderr.split("distrain: the job failed", 1)[1]
    for text in expected:
        assert text in summary, summary
    assert "rank 0 " not in summary  # the healthy rank was stopped, not reported as failed
    # Bounded from the bad rank's start (it fails at once), not the launch's: under a loaded
    # suite, start-up alone has taken over 30 s; stopping the healthy rank takes seconds.
    failed_at = (tmp_path / "pid-1-0").stat().st_mtime
    assert time.time() - failed_at < 20, f"the job took {time.time() - failed_at:.1f} s to stop"
    assert_workers_gone(tmp_path)


@both_start_methods
@pytest.mark.timeout(120)
def test_teardown_abort_is_named_but_still_fails(tmp_path: Path) -> None:
    result = _failing_run(tmp_path, "abort")
    assert result.returncode == 1
    assert "gloo teardown abort" in result.stderr and "distrain.ddp.cleanup()" in result.stderr
    result = _failing_run(tmp_path, "raise-abort")
    assert result.returncode == 1
    assert "killed by SIGABRT" in result.stderr and "gloo teardown abort" not in result.stderr


@both_start_methods
@pytest.mark.timeout(120)
def test_max_restarts_restarts_the_group(tmp_path: Path) -> None:
    result = _failing_run(tmp_path, "restart", "--max-restarts", "1")
    assert_ok(result)
    assert "[rank0]:rank 0 ok on attempt 1" in result.stdout
    assert "[rank1]:rank 1 ok on attempt 1" in result.stdout
    assert (tmp_path / "pid-1-0").exists() and (tmp_path / "pid-1-1").exists()


def _start_and_signal(tmp_path: Path, mode: str, sig: signal.Signals, *extra: str) -> tuple[int, str, float]:
    proc = subprocess.Popen(
        [PYTHON, "-m", "distrain", "launch", "--nproc-per-node", "2", *extra,
         str(SCRIPTS / "behave.py")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=child_env({"OUT_DIR": str(tmp_path), "BEHAVE": mode}))
    try:
        # Wait until both workers installed their handlers: they announce it with a file.
        wait_for_files([tmp_path / f"ready-{r}" for r in (0, 1)], proc)
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out + err, time.monotonic() - sent
    finally:
        kill_group(proc.pid)


@both_start_methods
@pytest.mark.timeout(120)
def test_sigterm_reaches_the_workers_so_they_can_save(tmp_path: Path) -> None:
    code, output, took = _start_and_signal(tmp_path, "sigterm", signal.SIGTERM)
    assert code == 143, output
    assert took < 20, f"the workers exited in their handler, yet the launcher waited {took:.1f} s"
    assert all((tmp_path / f"got-sigterm-{r}").read_text() == "saved" for r in (0, 1))
    assert_workers_gone(tmp_path)


@both_start_methods
@pytest.mark.timeout(120)
def test_workers_ignoring_sigterm_are_killed_after_the_grace_period(tmp_path: Path) -> None:
    code, output, took = _start_and_signal(tmp_path, "ignore-term", signal.SIGTERM, "--term-timeout", "2")
    assert code == 143, output
    assert 1.5 < took < 20
    assert_workers_gone(tmp_path)


@both_start_methods
@pytest.mark.timeout(120)
def test_log_dir_has_a_file_per_rank_and_attempt_and_console_is_prefixed(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    result = _failing_run(tmp_path, "restart", "--max-restarts", "1", "--log-dir", str(logs))
    assert_ok(result)
    stdout_files = sorted(p.relative_to(logs).parts[1:] for p in logs.rglob("stdout.log"))
    assert stdout_files == [("attempt_0", "0", "stdout.log"), ("attempt_0", "1", "stdout.log"),
                            ("attempt_1", "0", "stdout.log"), ("attempt_1", "1", "stdout.log")]
    assert "failing on the first attempt" in next(logs.rglob("attempt_0/1/stdout.log")).read_text()
    assert "[rank1]:worker 1 starting in mode restart" in result.stdout


@both_start_methods
@pytest.mark.timeout(120)
def test_module_and_no_python_entrypoints(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(
        "import os, sys\nprint('module rank', os.environ['RANK'], sys.argv[1:], __name__)\n")
    result = distrain("launch", "--nproc-per-node", "2", "-m", "pkg.train", "x", cwd=tmp_path,
                      env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert_ok(result)
    assert "[rank1]:module rank 1 ['x'] __main__" in result.stdout
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\necho shell rank $RANK of $WORLD_SIZE\n")
    tool.chmod(0o755)
    result = distrain("launch", "--nproc-per-node", "2", "--no-python", str(tool))
    assert_ok(result)
    assert "[rank0]:shell rank 0 of 2" in result.stdout


def _square_plus(x: int) -> int:
    return int(os.environ["RANK"]) ** 2 + x


@pytest.mark.timeout(120)
def test_python_api_returns_each_ranks_value() -> None:
    from distrain.launch import run

    before = signal.getsignal(signal.SIGTERM)
    assert run(_square_plus, 10, nproc=2) == {0: 10, 1: 11}
    assert signal.getsignal(signal.SIGTERM) is before  # elastic's raising handler is not left behind


@pytest.mark.timeout(120)
def test_python_api_launches_a_script_twice_each_time_with_a_fresh_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_method: str) -> None:
    from distrain.launch import LaunchConfig, launch, run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # a function launch first (forkserver: the default): its server must go too
    assert run(_square_plus, 0, nproc=1) == {0: 0}
    for nproc, omp_threads in ((2, "1"), (1, None)):  # torchrun's rule: 1 thread when several ranks
        out = tmp_path / str(nproc)
        out.mkdir()
        monkeypatch.setenv("OUT_DIR", str(out))
        result = launch(LaunchConfig(entrypoint=str(SCRIPTS / "dump_env.py"), nproc_per_node=nproc,
                                     start_method=start_method))
        assert result.ok, result.summary()
        assert [env.get("OMP_NUM_THREADS") for env in _envs(out).values()] == [omp_threads] * nproc
        assert "OMP_NUM_THREADS" not in os.environ  # the launch's environment is undone...
        # ...and its server gone (multiprocessing's resource tracker lives as long as this process)
        left = [" ".join(child.cmdline()) for child in psutil.Process().children()]
        assert not [cmd for cmd in left if "resource_tracker" not in cmd], left


def _raise_while_a_peer_fails_first() -> None:
    import atexit
    import threading

    import torch.distributed as dist

    from distrain import ddp

    ctx = ddp.init("gloo")
    if ctx.rank == 1:
        dist.destroy_process_group()  # rank 0's barrier fails at once and it exits first...
        atexit.register(threading.Event().wait)  # ...while this rank is slow to leave
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()


@both_start_methods
@pytest.mark.timeout(120)
def test_the_rank_that_raised_is_named_first_even_when_a_peer_exits_before_it() -> None:
    from distrain.errors import LaunchFailedError
    from distrain.launch import run

    with pytest.raises(LaunchFailedError) as failed:
        run(_raise_while_a_peer_fails_first, nproc=2)
    summary = str(failed.value)
    assert "rank 1 (local rank 1" in summary and "fails on purpose" in summary, summary
    peer = summary.find("rank 0 (local rank 0")  # listed after the cause, if at all
    assert peer == -1 or summary.index("rank 1 (local rank 1") < peer, summary


@pytest.mark.timeout(60)
def test_env_command_prints_versions() -> None:
    result = distrain("env", env={"RANK": "3"})
    assert result.returncode == 0, result.stderr
    for key in ("python", "torch", "torchvision", "ray", "tensorboardX", "gloo", "cuda available", "$RANK"):
        assert key in result.stdout
    assert sys.version.split()[0] in result.stdout


@pytest.mark.timeout(120)
def test_script_behaves_like_a_fresh_interpreter(tmp_path: Path, start_method: str) -> None:
    result = distrain("launch", "--nproc-per-node", "2", str(SCRIPTS / "fast_checks.py"), "--flag",
                      env={"OUT_DIR": str(tmp_path)})
    assert_ok(result)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"fast-{rank}.json").read_text())
        assert seen == {"sibling": "sibling imported", "path0": str(SCRIPTS),
                        "argv": [str(SCRIPTS / "fast_checks.py"), "--flag"], "squares": [1, 4, 9],
                        "loader_total": 28.0, "cuda_initialized": False}


@both_start_methods
@pytest.mark.timeout(180)
def test_the_fast_start_server_preloads_the_scripts_imports(tmp_path: Path, start_method: str) -> None:
    probe = str(SCRIPTS / "preload_probe.py")
    from distrain.launchers.preload_scan import usable_cores

    found = ["sklearn.datasets", "tensorboardX", "torch._dynamo"]
    cases = (("script", found), ("auto", found if usable_cores() < 2 else []), ("torch", []),
             # a module named outright brings what it lists in DISTRAIN_PRELOAD too (sklearn and
             # torchvision, which imports torch._dynamo itself)
             ("distrain.data.datasets", ["sklearn.datasets", "torch._dynamo"]))
    if start_method == "spawn":  # no server, nothing preloaded: one case shows it
        cases = cases[:1]
    for preload, expected in cases:
        out = tmp_path / preload
        out.mkdir()
        result = distrain("launch", "--nproc-per-node", "2", "--preload", preload, probe,
                          env={"OUT_DIR": str(out)})
        assert_ok(result)
        for rank in (0, 1):
            seen = json.loads((out / f"probe-{rank}.json").read_text())
            assert seen["loaded"] == (expected if start_method == "forkserver" else []), (preload, seen)
            # the server froze what it imported: a worker's gc never walks (and copies) it
            assert (seen["frozen"] > 100_000) == (start_method == "forkserver"), seen["frozen"]
            assert "DISTRAIN_PRELOAD_SCRIPT_IMPORTS" not in seen["env"]


@both_start_methods
@pytest.mark.timeout(120)
def test_no_server_or_worker_outlives_the_launcher(tmp_path: Path, start_method: str) -> None:
    proc = subprocess.Popen(
        [PYTHON, "-m", "distrain", "launch", "--nproc-per-node", "2", str(SCRIPTS / "behave.py")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=child_env({"OUT_DIR": str(tmp_path), "BEHAVE": "ok"}))
    launcher = psutil.Process(proc.pid)
    try:
        family: dict[int, str] = {}
        while proc.poll() is None:  # note every descendant (server, workers) while it runs
            with contextlib.suppress(psutil.Error):
                for child in launcher.children(recursive=True):
                    if child.pid not in family:
                        family[child.pid] = _command_line(child.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
        proc.communicate(timeout=60)
    finally:
        kill_group(proc.pid)
    assert proc.returncode == 0
    survivors = [pid for pid in family if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not survivors, f"left running: {[family[pid] for pid in survivors]}"
    assert_workers_gone(tmp_path)


def _command_line(pid: int) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{pid}: {' '.join(psutil.Process(pid).cmdline())}"
    return f"{pid}: (gone)"


@pytest.mark.timeout(180)
def test_a_restarted_group_can_init_its_process_group_again() -> None:
    # torchrun 2.14 keeps its rendezvous store across restarts, so a plain script's restarted
    # init_process_group reads the dead group's gloo addresses; distrain gives each attempt a
    # fresh store, and distrain.ddp.init keys its group per attempt (so it works under torchrun).
    script = str(SCRIPTS / "restart_pg.py")
    result = distrain("launch", "--nproc-per-node", "2", "--max-restarts", "1", script)
    assert_ok(result)
    assert "[rank1]:rank 1 finished attempt 1" in result.stdout
    result = torchrun("--nproc-per-node", "2", "--max-restarts", "1", script, env={"USE_DISTRAIN": "1"})
    assert_ok(result)
    assert "rank 1 finished attempt 1" in result.stdout
