"""Scalars as plain floats: one conversion shared by the logger, progress lines and metrics."""

from __future__ import annotations

from typing import Any

__all__ = ["to_float"]


def to_float(value: Any) -> float:
    """A number from a float, int, numpy scalar or one-element tensor (detached first).

    Args:
        value: The scalar.

    Returns:
        It as a Python float.
    """
    detach = getattr(value, "detach", None)
    return float(detach() if callable(detach) else value)
