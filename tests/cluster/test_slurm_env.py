"""distrain.launchers.slurm_env: SLURM's variables become launch defaults; explicit flags win.

Pure: the variables are a dict here. tests/cluster/test_slurm.py reads them from a real job.
"""

from __future__ import annotations

import pytest

from distrain.errors import ConfigError
from distrain.launch_cli import parse_launch_args
from distrain.launchers.slurm_env import describe, detect, expand_hostlist
from distrain.requeue import decide
from tests.helpers import distrain

# What srun sets for one task per node, on the second of three nodes (job 4711).
STEP = {"SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_STEP_ID": "0",
        "SLURM_STEP_NODELIST": "gpu[07-09]", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x3)",
        "SLURM_GPUS_ON_NODE": "4"}


@pytest.mark.parametrize(("text", "hosts"), [
    ("vm", ["vm"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[07-09,11],login", ["gpu07", "gpu08", "gpu09", "gpu11", "login"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_host_lists_expand_like_scontrol_show_hostnames(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


def test_srun_with_no_flags_gets_nodes_rank_head_job_id_and_gpus() -> None:
    args = parse_launch_args(["train.py"], environ=STEP)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("3", 1, "4")
    assert args.rdzv_backend == "c10d" and args.rdzv_id == "slurm-4711"
    assert args.rdzv_endpoint == "gpu07:19711"  # Lightning's port rule: 15000 + last 4 digits


def test_master_addr_and_port_in_the_environment_choose_the_endpoint() -> None:
    args = parse_launch_args(["train.py"], environ={**STEP, "MASTER_ADDR": "10.0.0.5",
                                                    "MASTER_PORT": "29400"})
    assert args.rdzv_endpoint == "10.0.0.5:29400"


def test_explicit_flags_win_and_any_rendezvous_flag_keeps_slurms_rendezvous_out() -> None:
    args = parse_launch_args(["--nproc-per-node", "2", "--nnodes", "3", "--master-addr", "h",
                              "--master-port", "5000", "--node-rank", "2", "train.py"], environ=STEP)
    assert (args.nproc_per_node, args.node_rank, args.master_addr) == ("2", 2, "h")
    assert args.rdzv_backend == "static" and args.rdzv_endpoint == "" and args.rdzv_id == "none"
    pet = parse_launch_args(["train.py"], environ={**STEP, "PET_NPROC_PER_NODE": "3",
                                                   "PET_RDZV_ENDPOINT": "x:1"})
    assert pet.nproc_per_node == "3" and pet.rdzv_endpoint == "x:1" and pet.rdzv_id == "none"
    assert pet.nnodes == "3"  # still from SLURM: not a rendezvous flag


def test_ray_launcher_and_no_slurm_keep_the_plain_defaults() -> None:
    ray = parse_launch_args(["--launcher", "ray", "train.py"], environ=STEP)
    assert (ray.nnodes, ray.nproc_per_node, ray.rdzv_backend) == ("1", "1", "static")
    plain = parse_launch_args(["train.py"], environ={})
    assert (plain.nnodes, plain.rdzv_backend) == ("1", "static") and detect({}) is None


def test_one_node_keeps_a_private_store_and_the_batch_shell_uses_tasks_per_node() -> None:
    batch = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "vm", "SLURM_NTASKS_PER_NODE": "2"}
    args = parse_launch_args(["train.py"], environ=batch)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("1", "2", "static")
    assert ("slurm rendezvous", "one node: private store on a free port") in describe(detect(batch))


def test_several_launchers_per_node_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="srun --ntasks-per-node=1"):
        parse_launch_args(["train.py"], environ={**STEP, "SLURM_STEP_TASKS_PER_NODE": "2(x3)"})


def test_distrain_env_prints_what_it_detected() -> None:
    result = distrain("env", env=STEP, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "slurm job             4711" in result.stdout
    assert "slurm nodes           3: gpu07,gpu08,gpu09" in result.stdout
    assert "slurm nproc-per-node  4 (SLURM_GPUS_ON_NODE)" in result.stdout
    assert "slurm rendezvous      c10d gpu07:19711 id slurm-4711" in result.stdout


def test_a_bad_host_list_is_one_line_exit_2() -> None:
    result = distrain("launch", "train.py", env={**STEP, "SLURM_STEP_NODELIST": "n[a-b]"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "SLURM_JOB_NODELIST='n[a-b]' is invalid" in result.stderr


def test_requeue_is_bounded_by_the_restart_count() -> None:
    assert decide({"SLURM_JOB_ID": "5"}, 2).requeue
    assert not decide({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "2"}, 2).requeue
    with pytest.raises(ConfigError, match="SLURM_JOB_ID"):
        decide({}, 2)
    result = distrain("requeue", "--max", "1", env={"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "1"})
    assert result.returncode == 3 and "job 5 not requeued: it already restarted 1 times" in result.stderr


def test_a_rank_inside_a_job_takes_nothing_from_slurm() -> None:
    """A rank's SLURM_* are its launcher's task's (SLURM_PROCID is the node's): a nested
    ``distrain launch`` in a rank must not join the outer job's rendezvous."""
    rank = {**STEP, "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "12", "MASTER_ADDR": "gpu07",
            "MASTER_PORT": "29500"}
    assert detect(rank) is None
    args = parse_launch_args(["train.py"], environ=rank)
    assert (args.nnodes, args.node_rank, args.rdzv_backend) == ("1", 0, "static")
    assert describe(None)[0][1].startswith("nothing taken: not in a SLURM job, or a rank")
