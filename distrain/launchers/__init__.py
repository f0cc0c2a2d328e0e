"""One module per way of starting workers; each implements :class:`Launcher`."""

from distrain.launchers.base import Launcher

__all__ = ["Launcher"]
