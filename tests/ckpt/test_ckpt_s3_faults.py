"""S3 checkpoints under faults, against a real S3 endpoint (moto's server on 127.0.0.1).

* The server goes down in the middle of a save (at the first upload of the new step's
  objects; full sync, sharded sync, full async joined by the next save or by ``wait()``): every
  rank raises ``CheckpointError`` within a bounded time, and once the server is back the
  previous checkpoint loads exactly.
* A sharded checkpoint written by 2 ranks resumes on 4 ranks and on 1.
* A corrupted object: ``distrain ckpt verify`` names it, ``load_latest`` skips to the previous
  checkpoint; ``ls``/``inspect``/``export`` read URLs and export writes a local file.
* A URL whose storage library is missing: one line naming the extra to install.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from distrain.ckpt import Checkpointer, CheckpointError, CheckpointWarning
from distrain.errors import ConfigError
from tests.helpers import distrain, spawn_multi_process
from tests.helpers.ckpt import CTX
from tests.helpers.s3server import S3Server, s3  # noqa: F401  # the fixture
from tests.helpers.sharded_train import run_phases

OUTAGE_BOUND_S = 90.0  # the store's retry deadline (60 s) plus a collective and slack


def _wait_for(path: Path, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {seconds}s")
        time.sleep(0.05)  # polling a file another process writes, with a deadline


def outage_worker(ctx: Any, roots: dict[str, str], marks: str) -> dict[str, Any]:
    """On every rank: save step 2 everywhere, then step 4 (and 6, or wait(), async) while the server
    goes down; the test restarts it between the cases (files in ``marks`` say when)."""
    from distrain import ddp

    torch.manual_seed(0)
    model = ddp.wrap(nn.Linear(64, 64), ctx, strategy="ddp")
    savers = {"full": Checkpointer(roots["full"], ctx), "sharded": Checkpointer(roots["sharded"], ctx,
                                                                               sharded=True),
              "async": Checkpointer(roots["async"], ctx, async_save=True),
              "async-wait": Checkpointer(roots["async-wait"], ctx, async_save=True)}
    for saver in savers.values():
        saver.save(2, model=model)
        saver.wait()
    saved = {k: v.clone() for k, v in ddp.unwrap(model).state_dict().items()}
    out: dict[str, Any] = {}
    for case, saver in savers.items():
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1.0)
        _wait_for(Path(marks) / f"armed-{case}")
        start = time.monotonic()
        try:
            saver.save(4, model=model)
            if case == "async":  # the upload fails in the background: the next save says so
                saver.save(6, model=model)
            elif case == "async-wait":  # ... or wait(), on every rank (rank 0 alone uploads)
                saver.wait()
            out[case] = "no error"
        except CheckpointError as error:
            out[case] = str(error)
        out[f"{case}-seconds"] = time.monotonic() - start
        ddp.barrier()
        if ctx.is_main:
            (Path(marks) / f"failed-{case}").write_text("")
    _wait_for(Path(marks) / "restored")
    for case in savers:
        fresh = ddp.wrap(nn.Linear(64, 64), ctx, strategy="ddp")
        step = Checkpointer(roots[case], ctx).load_latest(model=fresh)
        state = ddp.unwrap(fresh).state_dict()
        out[f"{case}-loaded"] = step
        out[f"{case}-equal"] = all(torch.equal(state[k], v) for k, v in saved.items())
    ddp.cleanup()
    return out


def _operate(server: S3Server, bucket: str, marks: Path, cases: list[str],
             failures: list[BaseException]) -> None:
    """The test's side: arm the outage for each case, bring the server back after it."""
    try:
        for case in cases:
            server.stop_at(f"/{bucket}/{case}/step-00000004/", method="PUT")  # an upload
            (marks / f"armed-{case}").write_text("")
            _wait_for(marks / f"failed-{case}")
            server.restart()
        (marks / "restored").write_text("")
    except BaseException as error:  # reported by the test
        failures.append(error)
        (marks / "restored").write_text("")


@pytest.mark.timeout(600)
def test_server_down_mid_save_fails_every_rank_and_the_previous_checkpoint_loads(
        s3: S3Server, tmp_path: Path) -> None:  # noqa: F811
    bucket = s3.make_bucket()
    cases = ["full", "sharded", "async", "async-wait"]
    roots = {case: f"s3://{bucket}/{case}" for case in cases}
    failures: list[BaseException] = []
    operator = threading.Thread(target=_operate, args=(s3, bucket, tmp_path, cases, failures))
    operator.start()
    try:
        results = spawn_multi_process(2, "gloo", outage_worker, roots, str(tmp_path))
    finally:
        (tmp_path / "restored").write_text("")
        for case in cases:
            (tmp_path / f"failed-{case}").write_text("")
        operator.join(timeout=120)
    assert not failures, failures
    print({case: round(results[0][f"{case}-seconds"], 1) for case in cases})  # seconds to fail
    for rank, out in results.items():
        for case in cases:
            assert out[case] != "no error", f"rank {rank} {case}: the save did not fail"
            assert "could not" in out[case] or "failed" in out[case], out[case]
            assert out[f"{case}-seconds"] < OUTAGE_BOUND_S, (case, out[f"{case}-seconds"])
            assert out[f"{case}-loaded"] == 2 and out[f"{case}-equal"], (rank, case, out)


@pytest.mark.timeout(600)
def test_sharded_s3_checkpoint_from_2_ranks_resumes_on_4_and_on_1(s3: S3Server) -> None:  # noqa: F811
    root = f"s3://{s3.make_bucket()}/sharded"
    two = spawn_multi_process(2, "gloo", run_phases, [
        {"strategy": "fsdp", "steps": 4, "save": root, "save_at": [4], "capture_at": [4]}])
    want = two[0][0]["states"]["4"]
    four = spawn_multi_process(4, "gloo", run_phases, [{"strategy": "fsdp", "load": root, "steps": 4}])
    one = spawn_multi_process(1, "gloo", run_phases, [{"strategy": "ddp", "load": root, "steps": 4}])
    for name, got in (("4 ranks", four[0][0]), ("1 rank", one[0][0])):
        assert got["loaded"] == 4, name
        state = got["states"]["loaded-4"]
        for key, value in want["model"].items():
            assert torch.allclose(state["model"][key], value, atol=0, rtol=0), (name, key)
        assert torch.equal(state["optimizer"]["state"]["embed.weight"]["exp_avg"],
                           want["optimizer"]["state"]["embed.weight"]["exp_avg"]), name


def _corrupt(server: S3Server, bucket: str, key: str) -> None:
    client = server.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest can tell
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


def test_a_corrupted_object_is_named_by_verify_and_skipped_by_load_latest(
        s3: S3Server, tmp_path: Path) -> None:  # noqa: F811
    bucket = s3.make_bucket()
    root = f"s3://{bucket}/run"
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    ckpt = Checkpointer(root, CTX)
    ckpt.save(1, model=model)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.save(2, model=model)
    env = s3.env()

    listed = distrain("ckpt", "ls", root, env=env)
    assert listed.returncode == 0 and "* 2" in listed.stdout.replace("*  ", "* "), listed.stdout
    out = tmp_path / "weights.pt"
    exported = distrain("ckpt", "export", root, "--out", str(out), env=env)
    assert exported.returncode == 0, exported.stderr
    assert torch.equal(torch.load(out, weights_only=True)["weight"], model.weight.detach())
    before = len(s3.requests("GET", f"/{bucket}/run/"))
    inspected = distrain("ckpt", "inspect", root, env=env)
    assert inspected.returncode == 0 and "step-00000002" in inspected.stdout, inspected.stdout
    downloads = s3.requests("GET", f"/{bucket}/run/")[before:]  # verified, then read: once each
    objects = {f"/{bucket}/run/step-00000002/{name}" for name in
               ("manifest.json", "model.pt", "rng.pt", "extra.json")}
    assert sorted(downloads) == sorted(objects), downloads

    _corrupt(s3, bucket, "run/step-00000002/model.pt")
    checked = distrain("ckpt", "verify", root, env=env)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "step-00000002: model.pt: xxh3_128 mismatch" in checked.stdout, checked.stdout
    assert f"OK      {root}/step-00000001" in checked.stdout

    fresh = nn.Linear(16, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = Checkpointer(root, CTX).load_latest(model=fresh)
    assert step == 1
    assert any(issubclass(w.category, CheckpointWarning) and "step-00000002" in str(w.message)
               for w in caught)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in first.items())


@pytest.mark.parametrize(("url", "extra"), [("gs://bucket/run", "gcs")])
def test_a_url_without_its_library_names_the_extra(url: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here: the missing-library message cannot be shown")
    with pytest.raises(ConfigError) as caught:
        Checkpointer(url, CTX)
    message = str(caught.value)
    assert f"distrain[{extra}]" in message and "\n" not in message, message
    result = distrain("ckpt", "ls", url)
    assert result.returncode == 2 and f"distrain[{extra}]" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
