"""An asynchronous S3 save still in flight at ``distrain.cleanup()`` (moto's server on 127.0.0.1).

Two launches of 2 gloo ranks (tests/scripts/s3_train.py: 2 steps, then a full and a sharded
async save of step 2; the script never calls ``wait()``):

* the server goes down at the first upload of the sharded save: ``cleanup()`` alone raises
  ``CheckpointError`` on every rank, and every rank exits non-zero;
* the same with a script that never calls ``cleanup()``: distrain's exit handler does, and
  the job still fails: a rank exits 1 naming the error;
* the server stays up, and rank 1's Checkpointers are garbage-collected before ``cleanup()``
  while rank 0 keeps its own (the case that once hung): both ranks exit 0 in bounded time, and
  step 2 is committed in both roots.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from distrain.ckpt.objstore import open_store
from tests.helpers import REPO, assert_ok, distrain
from tests.helpers.s3server import S3Server, s3  # noqa: F401  # the fixture

SCRIPT = str(REPO / "tests" / "scripts" / "s3_train.py")


def launch(spec: dict[str, Any], where: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    where.mkdir(parents=True, exist_ok=True)
    (where / "spec.json").write_text(json.dumps([spec]))
    return distrain("launch", "--nproc-per-node", "2", SCRIPT, str(where / "spec.json"),
                    timeout=150, env=env, cwd=where)


def spec(bucket: str, run: str, out: Path, **more: Any) -> dict[str, Any]:
    return {"steps": 2, "save_every": 2, "out": str(out), "wait": False,
            "save": [{"root": f"s3://{bucket}/{run}-{kind}", "sharded": kind == "sharded", "async": True}
                     for kind in ("full", "sharded")], **more}


@pytest.mark.timeout(300)
def test_cleanup_raises_an_async_save_error_on_every_rank(s3: S3Server, tmp_path: Path) -> None:  # noqa: F811
    bucket = s3.make_bucket()
    # At the first upload of the sharded save (the full one is in flight or done by then)
    tripped = s3.stop_at("-sharded/step-00000002/", method="PUT")
    try:
        result = launch(spec(bucket, "down", tmp_path / "out.pt"), tmp_path, s3.env())
    finally:
        s3.restart()
    text = result.stdout + result.stderr
    assert tripped.is_set(), text[-4000:]
    assert result.returncode != 0, text[-4000:]
    for rank in (0, 1):  # each rank's own lines, prefixed by the launcher: its traceback
        own = [line.split(":", 1)[1] for line in text.splitlines() if line.startswith(f"[rank{rank}]:")]
        assert any(line.strip() == "ddp.cleanup()" for line in own), text[-4000:]
        assert own and own[-1].startswith("distrain.errors.CheckpointError: "), text[-4000:]
    assert "step-00000002" in text, text[-4000:]


@pytest.mark.timeout(300)
def test_a_script_that_never_calls_cleanup_still_fails_with_its_save(s3: S3Server,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    bucket = s3.make_bucket()
    tripped = s3.stop_at("-sharded/step-00000002/", method="PUT")
    try:
        result = launch(spec(bucket, "exit", tmp_path / "out.pt"), tmp_path,
                        {**s3.env(), "S3_TRAIN_NO_CLEANUP": "1"})
    finally:
        s3.restart()
    text = result.stdout + result.stderr
    assert tripped.is_set(), text[-4000:]
    assert result.returncode != 0, text[-4000:]  # Python alone would have exited 0
    # The first rank to leave exits 1 naming the error; the launcher then stops the other one,
    # which may be gone before its own line.
    assert "]:distrain: distrain.errors.CheckpointError: " in text, text[-4000:]
    assert "exitcode 1" in text or "exit code 1" in text, text[-4000:]


@pytest.mark.timeout(300)
def test_cleanup_finishes_a_save_whose_checkpointer_is_gone(s3: S3Server, tmp_path: Path) -> None:  # noqa: F811
    bucket = s3.make_bucket()
    result = launch(spec(bucket, "gone", tmp_path / "out.pt", keep_on=[0]), tmp_path, s3.env())
    assert_ok(result)
    for kind in ("full", "sharded"):
        store = open_store(f"s3://{bucket}/gone-{kind}")
        assert store.latest_name() == "step-00000002", kind
        assert [step for step, _ in store.checkpoints()] == [2], kind
