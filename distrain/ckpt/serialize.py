"""``torch.save`` for checkpoint files: without the zip format's CRC32 of every record.

torch's zip writer computes a CRC32 of every tensor's bytes by default, at a fraction of memory
speed: for a ~100 MB state dict it is nearly all of ``torch.save``'s time, and an object-store
upload cannot start before serialization ends. Checkpoint files need no CRC: the manifest
records a digest of every file (:mod:`distrain.ckpt.digest`) that ``load_latest`` and
``distrain ckpt verify`` check, and ``torch.load`` does not read the CRCs.

torch keeps the option (``torch.serialization.set_crc32_options``) per thread, so switching it
off around one save changes nothing for the user's own ``torch.save`` calls.
"""

from __future__ import annotations

from typing import IO, Any

import torch


def save(state: Any, file: IO[bytes]) -> None:
    """``torch.save(state, file)`` without CRC32s (see the module docstring).

    Args:
        state: What to save (a state dict, RNG states, ...).
        file: A binary file object (a file on disk, or an upload: :mod:`distrain.ckpt.upload`).
    """
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, file)
    finally:
        torch.serialization.set_crc32_options(before)
