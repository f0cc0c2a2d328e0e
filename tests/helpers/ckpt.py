"""Shared by the checkpoint tests: a one-process context, a pickle payload, a forged manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from distrain.ckpt.store import manifest_digest
from distrain.context import Context

CTX = Context(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
              device=torch.device("cpu"), backend=None, is_main=True)


def rewrite_manifest(path: Path, changed_file: str) -> None:
    """What an attacker does: make the manifest agree with a replaced file (an old-format,
    sha256 record: both kinds verify)."""
    from distrain.ckpt.digest import file_digest

    manifest = json.loads((path / "manifest.json").read_text())
    target = path / changed_file
    manifest["files"][changed_file] = {"sha256": file_digest(target, "sha256"), "size": target.stat().st_size}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


class Payload:
    """Unpickling this runs ``touch MARKER``: a real code-execution payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))
