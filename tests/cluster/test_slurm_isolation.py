"""The suite run inside an outer SLURM job (CI on a cluster) does not see that job's variables."""

from __future__ import annotations

import os

from distrain.launch_cli import parse_launch_args
from tests.helpers import PYTHON, REPO, child_env, run_cmd

# What a CI runner started by `srun` on node 2 of 2 of job 77 has.
OUTER = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "ci[1-2]", "SLURM_STEP_ID": "0",
         "SLURM_STEP_NODELIST": "ci[1-2]", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
         "SLURM_CONF": "/nonexistent/slurm.conf"}


def test_no_slurm_variable_reaches_a_test_or_its_children() -> None:
    assert not [k for k in os.environ if k.startswith("SLURM_")]
    assert not [k for k in child_env() if k.startswith("SLURM_")]
    args = parse_launch_args(["train.py"])  # this process's environment
    assert (args.nnodes, args.node_rank, args.rdzv_backend) == ("1", 0, "static")


def test_the_suite_inside_an_outer_slurm_job_strips_its_variables() -> None:
    """The test above, run by a pytest that starts with an outer job's SLURM_* set."""
    test = f"{__file__}::test_no_slurm_variable_reaches_a_test_or_its_children"
    result = run_cmd([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=OUTER,
                     cwd=REPO, timeout=120)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
    # Without the suite's fixture, the outer job would have set the defaults:
    outer = parse_launch_args(["train.py"], environ=OUTER)
    assert (outer.nnodes, outer.node_rank, outer.rdzv_backend) == ("2", 1, "c10d")
