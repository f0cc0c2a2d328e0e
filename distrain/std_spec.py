"""torchrun's ``--redirects`` / ``--tee`` value: ``3`` for every rank, or ``LOCAL_RANK:VALUE,...``."""

from __future__ import annotations

STD_VALUES = ("0", "1", "2", "3")  # none, stdout, stderr, both


def std_values(text: str) -> dict[int | None, int]:
    """``"3"`` -> ``{None: 3}``; ``"0:3,1:1"`` -> ``{0: 3, 1: 1}``.

    Raises:
        ValueError: A value outside 0-3 or a local rank that is not a number.
    """
    items = [text] if ":" not in text else text.split(",")
    values: dict[int | None, int] = {}
    for item in items:
        rank_text, _, value = item.rpartition(":")
        if value not in STD_VALUES or (rank_text and not rank_text.isdigit()):
            raise ValueError(text)
        values[int(rank_text) if rank_text else None] = int(value)
    return values


def std_value(text: str, local_rank: int) -> int:
    """The ``--redirects``/``--tee`` value of one local rank (0 when the spec leaves it out)."""
    values = std_values(text)
    return values.get(None, values.get(local_rank, 0))
