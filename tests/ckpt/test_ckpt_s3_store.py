"""The object-store commit protocol in one process: a real S3 endpoint (moto on 127.0.0.1) and
fsspec's ``memory://``; retention, stale objects, a step saved twice, both checkpoint kinds."""

from __future__ import annotations

import torch
from torch import nn

from distrain.ckpt import Checkpointer
from distrain.ckpt.objstore import ObjectStore, open_store
from distrain.ckpt.store import CheckpointStore, verify
from tests.helpers.ckpt import CTX
from tests.helpers.s3server import S3Server, s3  # noqa: F401  # the fixture


def _model(fill: float) -> nn.Linear:
    model = nn.Linear(8, 4)
    with torch.no_grad():
        model.weight.fill_(fill)
        model.bias.fill_(fill)
    return model


def test_retention_latest_and_a_step_saved_twice(s3: S3Server) -> None:  # noqa: F811
    root = f"s3://{s3.make_bucket()}/run"
    ckpt = Checkpointer(root, CTX, keep_last=2)
    for step in (1, 2, 3):
        ckpt.save(step, model=_model(step), extra={"step": step})
    store = open_store(root)
    assert isinstance(store, ObjectStore)
    assert [s for s, _ in store.checkpoints()] == [2, 3]
    assert store.latest_name() == "step-00000003"
    ckpt.save(3, model=_model(30.0), extra={"step": 30})  # the same step again: replaced
    fresh = _model(0.0)
    assert Checkpointer(root, CTX).load_latest(model=fresh) == 3
    assert torch.equal(fresh.weight, torch.full((4, 8), 30.0))
    assert all(verify(path).ok for _, path in store.checkpoints())


def test_objects_without_a_manifest_are_never_read_and_are_removed(s3: S3Server) -> None:  # noqa: F811
    bucket = s3.make_bucket()
    root = f"s3://{bucket}/run"
    Checkpointer(root, CTX).save(1, model=_model(1.0))
    client = s3.client()  # what a save killed mid-upload leaves: objects of step 2, no manifest
    client.put_object(Bucket=bucket, Key="run/step-00000002/model.pt", Body=b"partial")
    store = open_store(root)
    assert [s for s, _ in store.checkpoints()] == [1]
    fresh = _model(0.0)
    assert Checkpointer(root, CTX).load_latest(model=fresh) == 1  # rank 0 also cleans up here
    assert torch.equal(fresh.weight, torch.full((4, 8), 1.0))
    left = client.list_objects_v2(Bucket=bucket, Prefix="run/step-00000002/").get("KeyCount", 0)
    assert left == 0


def test_sharded_in_one_process_and_a_manifest_listing_every_shard(s3: S3Server) -> None:  # noqa: F811
    root = f"s3://{s3.make_bucket()}/sharded"
    model = _model(2.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 8)).sum().backward()
    optimizer.step()
    Checkpointer(root, CTX, sharded=True).save(5, model=model, optimizer=optimizer)
    store = open_store(root)
    (_, path), = store.checkpoints()
    result = verify(path)
    assert result.ok and result.manifest is not None, result.problems
    files = set(result.manifest["files"])
    assert {".metadata", "__0_0.distcp"} <= files
    assert not any(name.startswith(".digests-") for name in files)
    fresh = _model(0.0)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    assert Checkpointer(root, CTX).load_latest(model=fresh, optimizer=fresh_opt) == 5
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])


def test_any_fsspec_url_and_file_urls_are_directories(tmp_path: object) -> None:
    root = "memory://distrain-test/run"
    Checkpointer(root, CTX).save(7, model=_model(7.0))
    fresh = _model(0.0)
    assert Checkpointer(root, CTX).load_latest(model=fresh) == 7
    assert torch.equal(fresh.bias, torch.full((4,), 7.0))
    local = open_store(f"file://{tmp_path}/ckpt")
    assert isinstance(local, CheckpointStore)


def test_a_large_object_streams_in_parts_while_written_and_an_abort_leaves_nothing(
        s3: S3Server) -> None:  # noqa: F811
    from distrain.ckpt import digest
    from distrain.ckpt.remote import Remote
    from distrain.ckpt.upload import MultipartUpload

    bucket = s3.make_bucket()
    remote = Remote(f"s3://{bucket}/big")
    part = 5 << 20  # S3's smallest part
    data = torch.randint(0, 256, (13 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = data.numpy().tobytes()
    upload = MultipartUpload(remote, f"s3://{bucket}/big/obj", part_size=part, in_flight=2,
                             single_put=part)
    for start in range(0, len(raw), 3_000_001):  # writes that straddle part boundaries
        upload.write(memoryview(raw)[start:start + 3_000_001])
    assert upload.tell() == len(raw)
    record = upload.finish()
    hasher = digest.new()
    hasher.update(raw)
    assert record == digest.record(hasher, len(raw))
    assert remote.get(f"s3://{bucket}/big/obj") == raw
    parts = s3.requests("PUT", f"/{bucket}/big/obj")
    assert len(parts) == 3, parts  # 5 + 5 + 3 MB, each uploaded as it filled

    whole = MultipartUpload(remote, f"s3://{bucket}/big/one", part_size=part, single_put=len(raw))
    for start in range(0, len(raw), 3_000_001):  # up to single_put: kept whole, one PUT
        whole.write(memoryview(raw)[start:start + 3_000_001])
    assert whole.finish() == digest.record(hasher, len(raw))
    assert remote.get(f"s3://{bucket}/big/one") == raw
    assert s3.requests("PUT", f"/{bucket}/big/one") == [f"/{bucket}/big/one"]
    assert not s3.requests("POST", f"/{bucket}/big/one")  # no multipart upload started

    aborted = MultipartUpload(remote, f"s3://{bucket}/big/gone", part_size=part, single_put=part)
    aborted.write(raw[: 11 << 20])  # two parts out, the third still being written
    aborted.abort()
    client = s3.client()
    assert client.list_objects_v2(Bucket=bucket, Prefix="big/gone").get("KeyCount", 0) == 0
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
