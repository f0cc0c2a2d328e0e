"""GPU tests: run by ``make gpu-test`` on a machine with a CUDA GPU; deselected in ``make test``."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    reason = pytest.mark.skip(reason="no CUDA GPU visible (torch.cuda.is_available() is False); "
                                     "run `make gpu-test` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(reason)
