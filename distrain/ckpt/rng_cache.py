"""This process's RNG states after every step, cheaply: what did not change is not taken again.

``state.capture_rng`` costs hundreds of microseconds, nearly all in numpy's legacy ``get_state``
(it copies the 624-word Mersenne Twister key one element at a time) and in turning Python's
``random`` state into a tensor: more than a small training step's whole budget for a snapshot.
Most loops never touch those two generators, so :class:`RngCache` checks whether they moved:

* numpy: the key and position are read straight from the generator's state struct (the
  documented ``bit_generator.ctypes.state_address``; checked once against ``get_state``, and
  never used if they differ). Unchanged key and position with no cached Gaussian at the last
  capture means an unchanged state: drawing anything moves the key, except a normal draw that
  returns the cached second value of a pair, and that needs a cached value.
* ``random``: ``getstate()`` builds a tuple of 625 ints (tens of microseconds), so the
  generator's key and position are read straight from the object instead (CPython keeps them
  right after the object header; checked once against ``getstate``, and never used if they
  differ), with ``getstate()`` only when they moved or are not readable.

What :meth:`RngCache.capture` returns has ``capture_rng``'s layout (``restore_rng`` takes it).
"""

from __future__ import annotations

import ctypes
import random
import sys
from typing import Any

import numpy as np
import torch

from distrain.ckpt.state import capture_rng

_MT_WORDS = 624
_MT_BYTES = _MT_WORDS * 4 + 4  # uint32 key[624]; int pos
_PY_OFFSET = 16  # CPython's RandomObject: the object header (refcount, type), int index, key[624]
_GLOBAL: random.Random = random.random.__self__  # type: ignore[attr-defined]  # behind the module functions


class RngCache:
    """Captures RNG states, reusing the numpy and ``random`` parts while they are unchanged."""

    def __init__(self) -> None:
        self._numpy: dict[str, Any] | None = None
        self._numpy_raw: bytes | None = None
        self._python: dict[str, Any] | None = None
        self._python_raw: bytes | None = None
        self._address = _state_address()
        self._python_address = _python_address()

    def capture(self) -> dict[str, Any]:
        state = capture_rng() if self._numpy is None or self._python is None else None
        if state is not None:  # the first time: all of it, the reference for later
            self._numpy, self._python = state["numpy"], state["python"]
            self._numpy_raw = self._read_numpy()
            self._python_raw = self._read_python()
            return state
        cuda: list[torch.Tensor] = []
        if torch.cuda.is_initialized():  # cheap, unlike is_available(); False without CUDA
            cuda = list(torch.cuda.get_rng_state_all())
        return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": self._numpy_state(),
                "python": self._python_state()}

    def _read_numpy(self) -> bytes | None:
        return None if self._address is None else ctypes.string_at(self._address, _MT_BYTES)

    def _numpy_state(self) -> dict[str, Any]:
        raw = self._read_numpy()
        previous = self._numpy
        if raw is None or raw != self._numpy_raw or previous is None or previous["has_gauss"]:
            kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
            previous = {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}
            self._numpy, self._numpy_raw = previous, raw
        return previous

    def _read_python(self) -> bytes | None:
        address = self._python_address
        return None if address is None else ctypes.string_at(address, _MT_BYTES)

    def _python_state(self) -> dict[str, Any]:
        raw = self._read_python()
        previous = self._python
        gauss = getattr(_GLOBAL, "gauss_next", None)
        if raw is None or raw != self._python_raw or previous is None or gauss != previous["gauss_next"]:
            version, words, gauss = random.getstate()
            previous = {"version": int(version), "state": torch.tensor(words, dtype=torch.int64),
                        "gauss_next": gauss}
            self._python, self._python_raw = previous, raw
        return previous


def _state_address() -> int | None:
    """Where numpy's global Mersenne Twister keeps key and position, if it checks out."""
    try:
        generator = np.random.mtrand._rand._bit_generator  # the global np.random state
        address = int(generator.ctypes.state_address)
        raw = ctypes.string_at(address, _MT_BYTES)
        _, keys, pos, _, _ = np.random.get_state(legacy=True)
    except (AttributeError, TypeError, ValueError):
        return None
    words = np.frombuffer(raw[: _MT_WORDS * 4], dtype=np.uint32)
    position = int.from_bytes(raw[_MT_WORDS * 4:], "little", signed=True)
    return address if np.array_equal(words, keys) and position == int(pos) else None


def _python_address() -> int | None:
    """Where the ``random`` module's generator keeps position and key, if it checks out
    (CPython only: elsewhere ``id`` is no address, and the check fails)."""
    base = type(_GLOBAL).__base__
    if sys.implementation.name != "cpython" or getattr(base, "__basicsize__", 0) < _PY_OFFSET + _MT_BYTES:
        return None  # not that layout: reading there would not be safe
    try:
        address = id(_GLOBAL) + _PY_OFFSET
        raw = ctypes.string_at(address, _MT_BYTES)
        words = random.getstate()[1]
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    position = int.from_bytes(raw[:4], "little", signed=True)
    key = np.frombuffer(raw[4:], dtype=np.uint32)
    same = len(words) == _MT_WORDS + 1 and position == words[-1] and np.array_equal(key, words[:-1])
    return address if same else None
