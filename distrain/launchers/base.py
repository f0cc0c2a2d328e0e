"""The launcher interface: one method, ``launch(config) -> RunResult``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distrain.launch_config import LaunchConfig
    from distrain.results import RunResult


class Launcher(ABC):
    """Starts the workers of one job and waits for them."""

    @abstractmethod
    def launch(self, config: LaunchConfig) -> RunResult:
        """Run the job described by ``config``; never leaves a worker process behind."""
