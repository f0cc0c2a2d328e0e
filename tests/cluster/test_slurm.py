"""The sbatch templates under a real single-host SLURM (munged, slurmctld, slurmd; see slurm_cluster).

Submitted with ``sbatch`` as a user would, resource lines overridden on the command line (this is
a CPU node); read back through ``scontrol show job`` and the job's own output file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, assert_ok, distrain
from tests.helpers.slurm_cluster import SlurmCluster, slurm_cluster, slurm_unavailable

C10D = REPO / "cluster" / "slurm-c10d.sbatch"
KILL_WAIT = 30  # the cluster's KillWait: a process that ignores SIGTERM holds a job this long
TRAIN = REPO / "tests" / "scripts" / "slurm_train.py"
CPU_NODE = ("--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    reason = slurm_unavailable()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    with slurm_cluster() as started:
        yield started


def _output(run: Path, job_id: str) -> str:
    return (run / f"distrain-c10d-{job_id}.out").read_text()


def _wait_files(paths: list[Path], cluster: SlurmCluster, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state}"
        assert time.monotonic() < deadline, f"no {paths} after {timeout}s"
        time.sleep(0.1)


def test_srun_distrain_env_shows_what_slurm_said(cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "env.sbatch"
    # the batch shell, a step, and a rank that a launcher in a step started
    script.write_text("#!/bin/bash\nset -e\ndistrain env\nsrun --ntasks=1 distrain env\n"
                      "srun --ntasks=1 distrain launch --no-python distrain env\n")
    job_id = cluster.sbatch(script, options=["--ntasks-per-node=2", "-o", "env-%j.out"], cwd=tmp_path)
    info = cluster.wait_ended(job_id)
    text = (tmp_path / f"env-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", text
    node = cluster.nodes[0].name
    assert text.count(f"slurm job             {job_id}") == 2, text
    assert f"slurm nodes           1: {node}" in text
    # In the batch shell the job's 2 tasks per node become 2 ranks; a step of 1 task says nothing.
    assert "slurm nproc-per-node  2 (SLURM_NTASKS_PER_NODE)" in text
    assert "slurm nproc-per-node  not set by SLURM (launcher default)" in text
    assert "slurm rendezvous      one node: private store on a free port" in text
    # the rank's SLURM_* are its launcher's task's: a nested launch takes nothing from them
    rank_rows = [line.split(None, 1) for line in text.splitlines() if line.startswith("[rank0]:slurm")]
    assert rank_rows == [["[rank0]:slurm", "nothing taken: not in a SLURM job, or a rank (its launcher "
                                           "took them)"]], text


def test_c10d_template_trains_the_digits_example_to_completion(cluster: SlurmCluster,
                                                               tmp_path: Path) -> None:
    job_id = cluster.sbatch(C10D, str(REPO / "examples" / "digits_logging.py"), "--epochs", "1",
                            options=CPU_NODE, cwd=tmp_path, env={"NPROC_PER_NODE": "2"})
    info = cluster.wait_ended(job_id)
    text = _output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert "world_size" in text and "epoch 0: step" in text, text
    run = tmp_path / "runs" / job_id  # the template's default RUN_DIR
    assert sorted((run / "ckpt").glob("step-*")), f"no checkpoint under {run / 'ckpt'}"
    assert len(list((run / "logs").rglob("stderr.log"))) == 2, "per-rank logs under RUN_DIR/logs"


def _preempt(cluster: SlurmCluster, run: Path, max_requeues: int, scancel: list[str]) -> tuple[str, str]:
    job_id = cluster.sbatch(C10D, str(TRAIN), "--steps", "12", "--gate-at", "5", options=CPU_NODE,
                            cwd=run, env={"NPROC_PER_NODE": "2", "RUN_DIR": str(run),
                                          "MAX_REQUEUES": str(max_requeues)})
    _wait_files([run / "gate-rank0", run / "gate-rank1"], cluster, job_id)
    cluster.run("scancel", *scancel, job_id)
    signalled = time.monotonic()
    deadline = signalled + 240
    while True:  # a requeued job goes back to PENDING and runs again under the same id
        info = cluster.job(job_id)
        if info["JobState"] == "PENDING":  # requeued: no process of the attempt outlived it
            assert time.monotonic() - signalled < KILL_WAIT, f"job {job_id} sat in COMPLETING"
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED") and \
                int(info.get("Restarts", "0")) >= min(max_requeues, 1):
            break
        assert time.monotonic() < deadline, f"job {job_id}: {info}"
        time.sleep(0.2)
    return job_id, _output(run, job_id)


def test_preempted_job_saves_requeues_itself_and_resumes_exactly(cluster: SlurmCluster,
                                                                  tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    assert_ok(distrain("launch", "--nproc-per-node", "2", str(TRAIN), "--run-dir", str(reference),
                       "--steps", "12", timeout=180))
    run = tmp_path / "run"
    run.mkdir()
    job_id, text = _preempt(cluster, run, 2, ["--signal=TERM", "--batch"])
    info = cluster.job(job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "SIGTERM: saved step 5, exiting" in text, text
    assert f"distrain requeue: job {job_id} requeued (restart 1 of 2)" in text, text
    assert "resumed at step 5" in text and "done at step 12" in text, text
    expected = torch.load(reference / "final.pt")
    got = torch.load(run / "final.pt")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_requeues_are_bounded(cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id, text = _preempt(cluster, tmp_path, 0, ["--signal=TERM", "--batch"])
    info = cluster.job(job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text
    assert info["ExitCode"] == "143:0", info
    assert "SIGTERM: saved step 5, exiting" in text, text
    assert f"job {job_id} not requeued: it already restarted 0 times (--max 0)" in text, text
    assert not (tmp_path / "final.pt").exists()


def test_a_failing_rank_ends_the_job_with_the_summary_in_its_output(cluster: SlurmCluster,
                                                                    tmp_path: Path) -> None:
    job_id = cluster.sbatch(C10D, str(TRAIN), "--steps", "12", "--fail-at", "3", options=CPU_NODE,
                            cwd=tmp_path, env={"NPROC_PER_NODE": "2", "RUN_DIR": str(tmp_path)})
    info = cluster.wait_ended(job_id)
    text = _output(tmp_path, job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", (info, text)
    assert "rank 1 fails on purpose at step 3" in text, text
    assert "exit code 1" in text or "exitcode 1" in text, text
    assert "distrain requeue" not in text, text
