"""Where a node keeps a run's snapshots, and sweeping the ones whose run is gone.

``/dev/shm/distrain-snapshots-<hash of the checkpoint root>/`` (``DISTRAIN_SNAPSHOT_DIR`` instead of
``/dev/shm``) holds ``owner.json`` (the root it belongs to and that root's identity), every rank's
ring (``rank-<rank>/``) and the rings held for buddies on other nodes (``held-<rank>/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

PREFIX = "distrain-snapshots-"


def base_dir() -> Path:
    return Path(os.environ.get("DISTRAIN_SNAPSHOT_DIR") or "/dev/shm")


def root_id(root: str | os.PathLike[str]) -> str:
    """The checkpoint root as a stable string: an absolute path, or the URL as given."""
    text = os.fspath(root)
    return text if "://" in text else os.path.abspath(text)


def run_dir(root: str | os.PathLike[str]) -> Path:
    """This node's snapshot directory for the checkpoint root ``root`` (one per run)."""
    digest = hashlib.sha256(root_id(root).encode()).hexdigest()[:16]
    return base_dir() / f"{PREFIX}{digest}"


def identity(root: str) -> list[int] | None:
    """(device, inode) of a local root: a root deleted and made again is a different run."""
    if "://" in root:
        return None
    try:
        info = os.stat(root)
    except OSError:
        return None
    return [info.st_dev, info.st_ino]


def sweep(base: Path) -> list[Path]:
    """Remove snapshot directories whose local checkpoint root is gone or was made anew."""
    removed = []
    for path in base.glob(f"{PREFIX}*"):
        try:
            owner = json.loads((path / "owner.json").read_text())
        except (OSError, ValueError):
            continue  # being created, or not ours to judge
        root = str(owner.get("root", ""))
        if "://" not in root and identity(root) != owner.get("identity"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove(root: str | os.PathLike[str]) -> None:
    """Remove every snapshot of ``root`` on this node (all ranks)."""
    shutil.rmtree(run_dir(root), ignore_errors=True)
