"""The digits example (unchanged) trained across 2 separate hosts, checkpoints on S3 on a third:
every process on both hosts SIGKILLed mid-run, the same command started again on both, and the
final checkpoint's weights are equal (``torch.equal``) to those of an uninterrupted 2-host run."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.helpers import ABORT_LINE, PYTHON, REPO, child_env
from tests.helpers.hosts import Host, hosts_or_skip
from tests.helpers.nodes_launch import collect, launch, make_bucket, start_s3, stop

DIGITS = str(REPO / "examples" / "digits_ddp.py")
EPOCHS, STEPS_PER_EPOCH = 2, 23  # 1437 training images, 32 per rank, 2 ranks
# Copies the newest committed checkpoint under each store URL to a directory on the host's disk.
FETCH = """
import fsspec, os, sys
for url, out in zip(sys.argv[1::2], sys.argv[2::2]):
    fs, root = fsspec.core.url_to_fs(url)
    name = fs.cat(root + "/latest").decode().strip()
    os.makedirs(out)
    for file in ("model.pt", "extra.json"):
        fs.get(f"{root}/{name}/{file}", f"{out}/{file}")
    events = fs.glob(root.rsplit("/", 1)[0] + "/tb/*tfevents*")  # the run's TensorBoard events
    print(name, len(events))
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[list[Host], dict[str, str]]]:
    with hosts_or_skip(3) as hosts:
        server, s3_env = start_s3(hosts[2])
        try:
            yield hosts, s3_env
        finally:
            hosts[2].stop_daemon(server)


def run_dir(hosts: list[Host], s3_env: dict[str, str], name: str) -> str:
    return f"{make_bucket(hosts[0], s3_env, f'{name}-{uuid.uuid4().hex[:6]}')}/run"


def fetch_latest(host: Host, s3_env: dict[str, str],
                 urls: list[str]) -> list[tuple[str, dict[str, torch.Tensor], dict[str, Any], int]]:
    """Name, model state and extra values of the newest checkpoint under each URL (read on
    ``host``), and how many TensorBoard event files lie beside it in the store."""
    dirs = [f"fetched{i}" for i in range(len(urls))]
    argv = [arg for url, name in zip(urls, dirs, strict=True) for arg in (url, str(host.workdir / name))]
    fetched = host.run([PYTHON, "-c", FETCH, *argv], child_env(s3_env), check=True, timeout=120)
    lines = [line.split() for line in fetched.stdout.splitlines()]
    return [(name, torch.load(host.disk / folder / "model.pt"),
             json.loads((host.disk / folder / "extra.json").read_text())["extra"], int(events))
            for (name, events), folder in zip(lines, dirs, strict=True)]


def wait_for_output(host: Host, logs: str, text: str, procs: list[subprocess.Popen[str]],
                    timeout: float = 240) -> None:
    """Until rank 0's log file on ``host`` (``--log-dir``) holds ``text``; fails if an agent ends."""
    deadline = time.monotonic() + timeout
    while not any(text in path.read_text(errors="replace")
                  for path in (host.disk / logs).glob("*/attempt_*/0/stdout.log")):
        ended = [p.returncode for p in procs if p.poll() is not None]
        if ended or time.monotonic() > deadline:
            logs_text = "".join(p.read_text(errors="replace")[-3000:]
                                for p in (host.disk / logs).rglob("*.log"))
            raise AssertionError(f"agents ended {ended} before {text!r}:\n{logs_text}")
        time.sleep(0.05)


@pytest.mark.timeout(600)  # 216-321 s here at load average 17 to 31 (a shared 2-core machine)
def test_digits_on_two_hosts_resumes_exactly_after_every_process_is_killed(
        cluster: tuple[list[Host], dict[str, str]]) -> None:
    hosts, s3_env = cluster
    trainers = hosts[:2]
    interrupted, reference = run_dir(hosts, s3_env, "killed"), run_dir(hosts, s3_env, "reference")

    def start(url: str, logs: str) -> list[subprocess.Popen[str]]:
        return launch(trainers, "static", DIGITS, nproc=1, env=s3_env,
                      extra_flags=["--log-dir", str(trainers[0].workdir / logs)],
                      args=["--run-dir", url, "--epochs", str(EPOCHS)])

    began = time.monotonic()
    first = start(interrupted, "logs-first")
    try:
        # Printed after the epoch's checkpoint is committed (a synchronous save).
        wait_for_output(trainers[0], "logs-first", "epoch 0: step", first)
        killed = [pid for host in trainers for pid in host.kill_all()]
        for host in trainers:
            host.wait_no_processes()
    finally:
        stop(first)
    assert len(killed) >= 4  # an agent and a rank on each host
    killed_log = "".join(p.read_text() for p in (trainers[0].disk / "logs-first").glob("*/*/0/stdout.log"))
    assert f"epoch {EPOCHS - 1}:" not in killed_log, killed_log  # killed mid-run, not after the end
    killed_at = time.monotonic()
    # Both jobs at once: the resumed one and the uninterrupted reference (fresh ports each).
    procs = start(interrupted, "logs-second") + start(reference, "logs-reference")
    try:
        results = collect(procs, timeout=420)
    finally:
        stop(procs)
    print(f"first run to the kill {killed_at - began:.1f} s, resumed + reference runs "
          f"{time.monotonic() - killed_at:.1f} s")
    for code, out in results:
        assert code == 0 and ABORT_LINE not in out, out[-4000:]
    resumed_log = next((trainers[0].disk / "logs-second").glob("*/attempt_0/0/stdout.log")).read_text()
    epochs_run = [int(line.split()[1].rstrip(":")) for line in resumed_log.splitlines()
                  if line.startswith("epoch ")]
    assert epochs_run == list(range(1, EPOCHS)), resumed_log  # resumed after epoch 0
    [(got_name, got, got_extra, got_events), (want_name, want, want_extra, want_events)] = fetch_latest(
        trainers[0], s3_env, [f"{interrupted}/ckpt", f"{reference}/ckpt"])
    assert got_events == 2 and want_events == 1  # TensorBoard events in the store: one file per start
    assert got_name == want_name == f"step-{EPOCHS * STEPS_PER_EPOCH:08d}", (got_name, want_name)
    assert got_extra == want_extra and got_extra["epoch"] == EPOCHS - 1, (got_extra, want_extra)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
