"""Which modules the fast-start server imports: ``torch``, ``--preload``, and the script's own imports.

Forking the workers from a server that imported ``torch`` removes N ``import torch`` from the
start-up, but a script that then imports scikit-learn, torchvision or TensorBoard pays those
imports N times over again (``bench/`` compares the first step's time with torchrun's).
With ``--preload script`` the server also imports the modules the script imports at its top
level, read from its source without running it (``ast``); ``--preload auto`` (the default) does
so when the local ranks outnumber the usable cores (see ``resolve_preload``). Left out:

* the script's own modules (found next to it, or in its package for ``-m``): importing them
  would run user code in the server;
* (added) ``torch._dynamo``: building DDP and the first optimizer step import it (seconds of CPU
  per rank). Added whatever the script's own imports: a ``-m`` entry point often
  reaches torch only through its own package;
* modules known to start threads or services at import (forking a process with threads can
  deadlock the child): see ``NEVER_PRELOAD``.

Each is imported in the server with every error ignored (the worker imports it again and shows
the real error); see ``distrain/launchers/preload_guard.py``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

AUTO = "auto"
SCRIPT = "script"
NEVER_PRELOAD = frozenset({"__future__", "__main__", "ray", "wandb", "mlflow", "neptune", "comet_ml"})


def top_level_imports(source: str) -> list[str]:
    """Absolute module names imported at module level (also inside top-level ``if``/``try``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found: list[str] = []
    statements = list(tree.body)
    while statements:
        node = statements.pop(0)
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif isinstance(node, (ast.If, ast.Try)):
            statements.extend(node.body)
            statements.extend(getattr(node, "orelse", []))
            for handler in getattr(node, "handlers", []):
                statements.extend(handler.body)
    return list(dict.fromkeys(found))


def script_imports(script: str, *, module: bool) -> list[str]:
    """The script's top-level imports that are safe to import in the server (see module doc)."""
    if module:
        try:
            spec = importlib.util.find_spec(script)
        except (ImportError, ValueError):
            return []
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return []
        path = Path(spec.origin)
        own = {script.split(".")[0]}
    else:
        path = Path(script)
        own = set()
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    local_dir = path.resolve().parent
    names = []
    for name in top_level_imports(source):
        top = name.split(".")[0]
        if top in own or top in NEVER_PRELOAD or name in NEVER_PRELOAD:
            continue
        if (local_dir / f"{top}.py").exists() or (local_dir / top).is_dir():
            continue  # the script's sibling module or package: user code
        names.append(name)
    return names


# What a training step imports lazily: DistributedDataParallel() and the first optimizer step import
# torch._dynamo (seconds of CPU, paid by every rank before its first step).
TRAINING_LAZY_IMPORTS = ("torch._dynamo",)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def resolve_preload(preload: Sequence[str], script: str, *, module: bool, nproc: int,
                    cores: int) -> tuple[list[str], list[str]]:
    """(modules named by the user, modules found in the script) from the ``--preload`` tokens.

    ``script`` preloads the script's imports; ``auto`` does so only when the ``nproc`` local
    ranks outnumber the ``cores``. Preloading moves every rank's imports into the one server,
    ahead of the first fork: it pays when the ranks would otherwise queue for the cores, and
    only delays the first barrier when each rank has a core of its own to import on.
    """
    named = [name for name in preload if name not in (AUTO, SCRIPT)]
    wanted = SCRIPT in preload or (AUTO in preload and nproc > cores)
    found = [*script_imports(script, module=module), *TRAINING_LAZY_IMPORTS] if wanted else []
    return named, [name for name in dict.fromkeys(found) if name not in named]
