"""The files in cluster/: valid for the tool that reads them, and saying what distrain needs.

The ``ray up`` YAMLs go through Ray's own ``prepare_config`` + ``validate_config`` (what
``ray up`` runs first); every ``distrain launch`` line is parsed by distrain's own parser; the
shell scripts pass ``bash -n``.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from distrain.launch_cli import parse_launch_args
from tests.helpers import PYTHON, REPO

CLUSTER = REPO / "cluster"
SHARED = "/mnt/shared"


def _yaml(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def _launch_args(command: str, values: dict[str, str]) -> Any:
    """Parse the ``distrain launch ...`` in ``command`` with shell variables filled in."""
    text = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), command)
    text = re.sub(r"\$\(\(.*?\)\)", "4", text)
    argv = shlex.split(text)
    start = argv.index("distrain")
    assert argv[start + 1] == "launch", command
    return parse_launch_args(argv[start + 2:], environ={})


def _shell_command(path: Path, first_word: str) -> str:
    """The (backslash-continued) command line of ``path`` that starts with ``first_word``."""
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith(first_word):
            command = []
            for part in lines[index:]:
                command.append(part.rstrip("\\").strip())
                if not part.rstrip().endswith("\\"):
                    return " ".join(command)
    raise AssertionError(f"no line starting with {first_word!r} in {path.name}")


# Run in a child: importing Ray writes to os.environ and fixes its loopback setting for the
# whole test session.
VALIDATE = """
import sys, yaml
from ray.autoscaler._private.util import prepare_config, validate_config
validate_config(prepare_config(yaml.safe_load(open(sys.argv[1]))))
print("valid")
"""


@pytest.mark.parametrize("name", ["aws.yaml", "onprem.yaml"])
def test_ray_up_configs_pass_rays_own_validation(name: str) -> None:
    result = subprocess.run([PYTHON, "-c", VALIDATE, str(CLUSTER / name)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0 and "valid" in result.stdout, result.stderr[-3000:]
    config = _yaml(name)
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head --port=6379" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert any("distrain" in c for c in config["setup_commands"]), "distrain is installed"
    assert any(SHARED in c for c in config["initialization_commands"]), "shared storage mounted"
    assert config["file_mounts"], "the training code is copied to the cluster"


def test_aws_config_has_gpu_workers_for_the_documented_job() -> None:
    config = _yaml("aws.yaml")
    assert config["provider"]["type"] == "aws"
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == workers["max_workers"] == 2
    assert workers["node_config"]["InstanceType"].startswith(("g", "p"))
    assert config["head_node_type"] == "head"


def test_onprem_config_names_a_head_and_worker_ips() -> None:
    provider = _yaml("onprem.yaml")["provider"]
    assert provider["type"] == "local"
    ips = [provider["head_ip"], *provider["worker_ips"]]
    assert len(ips) >= 2 and len(set(ips)) == len(ips)
    for ip in ips:
        ipaddress.ip_address(ip)


def test_kuberay_rayjob_runs_distrain_on_a_shared_volume() -> None:
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert job["apiVersion"] == "ray.io/v1" and job["spec"]["shutdownAfterJobFinishes"] is True
    args = _launch_args(job["spec"]["entrypoint"], {})
    assert args.launcher == "ray" and args.ray_address == "auto"
    spec = job["spec"]["rayClusterSpec"]
    groups = spec["workerGroupSpecs"]
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]
                                          ["limits"].get("nvidia.com/gpu", 0)) for g in groups)
    ranks = int(args.nnodes) * int(args.nproc_per_node)
    assert ranks * float(args.gpus_per_worker) <= gpus, "the job fits on the worker GPUs"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    for pod in pods:
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[SHARED])
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert args.log_dir.startswith(SHARED)
    assert args.training_script_args[args.training_script_args.index("--ckpt") + 1].startswith(SHARED)


@pytest.mark.parametrize("name", ["slurm-ray.sbatch", "slurm-c10d.sbatch"])
def test_sbatch_scripts_pass_bash_n(name: str) -> None:
    result = subprocess.run(["bash", "-n", str(CLUSTER / name)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    text = (CLUSTER / name).read_text()
    assert text.startswith("#!/bin/bash") and "#SBATCH --nodes=" in text
    assert "set -euo pipefail" in text


def test_slurm_ray_script_starts_ray_on_every_node_then_launches_with_ray() -> None:
    """The command lines; tests/cluster/test_slurm_hosts.py submits the script to a 2-host SLURM."""
    path = CLUSTER / "slurm-ray.sbatch"
    node = _shell_command(path, "ray start")
    assert "--block" in node and '--num-gpus="$GPUS_PER_NODE"' in node
    head = _shell_command(path, 'srun --nodes=1 --ntasks=1 -w "$HEAD" \\')
    assert "ray_node --head" in head
    text = path.read_text()
    assert 'ray_node --address="$RAY_ADDRESS"' in text and 'for node in "${NODES[@]:1}"' in text
    assert "trap stop_ray EXIT" in text and "ray stop" not in text.replace("`ray stop`", "")
    launch = _shell_command(path, "distrain launch").replace(
        '"${per_rank[@]}"', "--cpus-per-worker 8 --gpus-per-worker 1")
    args = _launch_args(launch, {
        "RAY_ADDRESS": "10.0.0.1:6379", "SLURM_JOB_NUM_NODES": "2", "NPROC": "4",
        "RUN_DIR": "/shared/run", "SCRIPT": "train.py", "@": "--epochs"})
    assert args.launcher == "ray" and args.ray_address == "10.0.0.1:6379"
    assert args.nnodes == "1:2" and args.nproc_per_node == "4" and args.max_restarts == 3
    assert args.training_script == "train.py"


def test_slurm_c10d_script_launches_one_local_launcher_per_node() -> None:
    """No rendezvous flags: each launcher reads them from SLURM (tests/cluster/test_slurm.py runs it)."""
    path = CLUSTER / "slurm-c10d.sbatch"
    command = _shell_command(path, "srun --kill-on-bad-exit=1")
    assert "--ntasks-per-node=1" in command
    text = re.sub(r'"\$\{ranks\[@\]\}"', "", command)
    step = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "n[1-2]",
            "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4"}
    argv = shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: {"RUN_DIR": "/shared/run", "SCRIPT": "train.py",
                                                         "@": "--epochs"}.get(m.group(1), ""), text))
    args = parse_launch_args(argv[argv.index("launch") + 1:], environ=step)
    assert args.launcher == "local" and args.rdzv_backend == "c10d"
    assert args.rdzv_endpoint == "n1:15077" and args.rdzv_id == "slurm-77"
    assert args.nnodes == "2" and args.node_rank == 1 and args.nproc_per_node == "4"
    # The run directory the way the examples take it (examples/digits_ddp.py --run-dir).
    assert args.training_script_args[:2] == ["--run-dir", "/shared/run"]
    assert "#SBATCH --ntasks-per-node=1" in path.read_text()
