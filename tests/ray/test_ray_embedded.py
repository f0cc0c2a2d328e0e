"""``distrain launch --launcher ray`` with no cluster: it starts (and stops) its own local Ray."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO, assert_ok, distrain

pytestmark = pytest.mark.ray


def _processes_of(ray_tmp: str) -> list[str]:
    """Processes of that launch: Ray's own name the temp dir, actors and ranks inherit it."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and (
                    ray_tmp in line or proc.environ().get("RAY_TMPDIR") == ray_tmp):
                found.append(f"{proc.pid}: {line[:160]}")
        except psutil.Error:
            continue
    return found


@pytest.mark.timeout(150)
def test_no_address_starts_a_loopback_ray_runs_a_module_and_stops_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_tmp = tempfile.mkdtemp(prefix="dray-", dir="/tmp")  # short: Ray's socket paths
    out = tmp_path / "out"
    out.mkdir()
    result = distrain(
        "launch", "--launcher", "ray", "--num-workers", "2",
        "-m", "tests.scripts.ray_behave", "env", str(out),
        env={"RAY_TMPDIR": ray_tmp, "MY_SETTING": "from-the-driver"}, cwd=REPO, timeout=140,
    )
    assert_ok(result)
    assert "distrain: started a local Ray" in result.stderr
    assert (Path(ray_tmp) / "ray").is_dir(), "Ray did not use the private temp dir"
    envs = {rank: json.loads((out / f"env-{rank}.json").read_text()) for rank in (0, 1)}
    for rank, env in envs.items():
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "2"
        assert env["LOCAL_WORLD_SIZE"] == "2" and env["GROUP_WORLD_SIZE"] == "1"
        assert env["MASTER_ADDR"] == "127.0.0.1"  # bound to the loopback, not the interface
        assert env["OMP_NUM_THREADS"] == "1"
        assert env["MY_SETTING"] == "from-the-driver"  # a local Ray: the driver's environment
        assert "PYTHONBREAKPOINT" not in env  # ... as it was before ray.init wrote to it
        assert env["__cwd__"] == str(REPO)  # the launcher's directory, as locally
        assert env["__name__"] == "__main__"
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    leftovers = _processes_of(ray_tmp)
    assert not leftovers, f"the local Ray outlived the launcher: {leftovers}"
    shutil.rmtree(ray_tmp, ignore_errors=True)
