"""File digests of checkpoint manifests (distrain/ckpt/digest.py): xxh3_128 written, sha256 read."""

from __future__ import annotations

import hashlib
from pathlib import Path

from distrain.ckpt import digest


def test_records_name_their_algorithm_and_both_kinds_catch_a_flipped_bit(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40_000  # 10 MB: several read chunks
    target = tmp_path / "state.pt"
    target.write_bytes(data)
    hasher = digest.new()
    hasher.update(memoryview(data)[:123])
    hasher.update(memoryview(data)[123:])
    new = digest.record(hasher, len(data))
    assert new == digest.file_record(target) and set(new) == {"xxh3_128", "size"}
    old = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert digest.mismatch(target, new) is None and digest.mismatch(target, old) is None

    flipped = bytearray(data)
    flipped[5_000_001] ^= 0x04
    target.write_bytes(bytes(flipped))
    assert digest.mismatch(target, new) == "xxh3_128 mismatch (the file is corrupt)"
    assert digest.mismatch(target, old) == "sha256 mismatch (the file is corrupt)"
    assert digest.mismatch(target, {"md5": "x", "size": 1}) == (
        "no digest in the manifest (expected xxh3_128 or sha256)")
