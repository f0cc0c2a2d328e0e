"""Validation of what the user typed: each parser returns a typed value or raises ConfigError.

One function per flag (or family of flags), pure apart from ``check_entrypoint`` (which looks at
the file system and the import path) and ``cuda_count``; :func:`distrain.launch.config_from_args`
calls them once and builds the :class:`~distrain.launch.LaunchConfig` from their results.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

from distrain.errors import ConfigError

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+)(?::(?P<port>[^:]*))?$")


def parse_range(flag: str, text: str, fix: str) -> tuple[int, int]:
    """``"N"`` or ``"MIN:MAX"`` -> (min, max), both positive."""
    parts = text.split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(flag, text, "N or MIN:MAX with positive integers", fix)
    low, high = int(parts[0]), int(parts[-1])
    if low < 1 or high < low:
        raise ConfigError(flag, low if len(parts) == 1 else text, "1 <= MIN <= MAX", fix)
    return low, high


def parse_nnodes(text: str) -> tuple[int, int]:
    """``"N"`` or ``"MIN:MAX"`` -> (min, max)."""
    fix = "use --nnodes N or --nnodes MIN:MAX, e.g. --nnodes 2 or --nnodes 1:4"
    return parse_range("--nnodes", text, fix)


def parse_nproc_per_node(text: str, *, cuda_count: int, cpu_count: int) -> int:
    """torchrun's ``--nproc-per-node``: an integer, ``auto``, ``cpu`` or ``gpu``."""
    fix = "pass a positive integer, or auto|cpu|gpu"
    if text == "cpu":
        return cpu_count
    if text == "auto":
        return cuda_count if cuda_count > 0 else cpu_count
    if text == "gpu":
        if cuda_count == 0:
            raise ConfigError(
                "--nproc-per-node", text, "a machine with CUDA GPUs", "use cpu, auto or a number"
            )
        return cuda_count
    try:
        value = int(text)
    except ValueError:
        raise ConfigError("--nproc-per-node", text, "an integer or auto|cpu|gpu", fix) from None
    if value < 1:
        raise ConfigError("--nproc-per-node", text, "at least 1", fix)
    return value


def parse_port(text: str | int | None, flag: str) -> int | None:
    if text is None or text == "":
        return None
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise ConfigError(flag, text, "a port number 1-65535", f"fix {flag}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(flag, port, "a port number 1-65535", f"pick a port in 1-65535 for {flag}")
    return port


def parse_endpoint(text: str) -> tuple[str, int | None]:
    """``HOST[:PORT]`` -> (host, port or None); ``PORT`` 0 means "pick a free one"."""
    match = _HOST_PORT.match(text.strip())
    fix = "use HOST:PORT, e.g. --rdzv-endpoint 127.0.0.1:29400"
    if not match:
        raise ConfigError("--rdzv-endpoint", text, "HOST:PORT", fix)
    port_text = match.group("port")
    if port_text is None:
        return match.group("host"), None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError("--rdzv-endpoint", text, "HOST:PORT with a port 0-65535", fix)
    return match.group("host"), int(port_text)


def parse_hang_timeout(text: str | float) -> float:
    """``--hang-timeout SECONDS``: a finite number >= 0 (0 turns hang detection off)."""
    fix = "e.g. --hang-timeout 600, or --hang-timeout 0 to turn hang detection off"
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError("--hang-timeout", text, "a number of seconds >= 0", fix) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError("--hang-timeout", text, "a number of seconds >= 0", fix)
    return value


def parse_rdzv_conf(text: str) -> dict[str, str]:
    """``key1=v1,key2=v2`` -> dict."""
    conf: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                "--rdzv-conf", text, "KEY=VALUE pairs separated by commas", "e.g. timeout=900"
            )
        conf[key] = value
    return conf


def parse_std(text: str, flag: str, nproc: int) -> str:
    """``--redirects`` / ``--tee``: 0-3 for all ranks, or ``LOCAL_RANK:0-3,...``."""
    fix = f"use 0 (none), 1 (stdout), 2 (stderr) or 3 (both), e.g. {flag} 3 or {flag} 0:3,1:1"
    items = [text] if ":" not in text else text.split(",")
    for item in items:
        rank_text, _, value = item.rpartition(":")
        if value not in ("0", "1", "2", "3"):
            raise ConfigError(flag, text, "0, 1, 2, 3 or LOCAL_RANK:VALUE pairs", fix)
        if rank_text and (not rank_text.isdigit() or int(rank_text) >= nproc):
            raise ConfigError(flag, text, f"local ranks below {nproc}", fix)
    return text


def parse_ranks_filter(text: str, nproc: int) -> frozenset[int] | None:
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    fix = f"use comma-separated local ranks below {nproc}, e.g. --local-ranks-filter 0"
    if not all(p.isdigit() for p in parts):
        raise ConfigError("--local-ranks-filter", text, "comma-separated integers", fix)
    ranks = frozenset(int(p) for p in parts)
    if max(ranks) >= nproc:
        raise ConfigError("--local-ranks-filter", text, f"local ranks below {nproc}", fix)
    return ranks


def parse_num_workers(value: str | int | None, launcher: str) -> tuple[int, int] | None:
    """``--num-workers N``, or ``MIN:MAX`` (elastic; Ray launcher only) -> (min, max)."""
    if value is None:
        return None
    text = str(value).strip()
    fix = "e.g. --num-workers 4, or --num-workers 2:4 with --launcher ray"
    low, high = parse_range("--num-workers", text, fix)
    if low != high and launcher != "ray":
        raise ConfigError("--num-workers", text, "MIN:MAX only with --launcher ray",
                          "use --nnodes MIN:MAX with --rdzv-backend c10d for the local launcher")
    return low, high


def check_entrypoint(script: str | None, *, module: bool, no_python: bool) -> str:
    if not script:
        raise ConfigError(
            "script", script, "a training script (or -m module)", "e.g. distrain launch train.py"
        )
    if module and no_python:
        raise ConfigError("-m/--no-python", script, "one of them", "drop --no-python or -m")
    if module:
        try:
            found = importlib.util.find_spec(script) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(
                "-m", script, "an importable module", "check the name and that it is on PYTHONPATH"
            )
        return script
    if no_python:
        return script
    path = Path(script)
    if not path.exists():
        raise ConfigError("script", script, "an existing file", "check the path")
    if path.is_dir():
        raise ConfigError("script", script, "a Python file, not a directory", "name the .py file")
    return script


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
