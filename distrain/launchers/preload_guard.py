"""Imported by the fast-start server last: every module beyond torch, each allowed to fail.

``multiprocessing``'s forkserver skips a preload module that raises ImportError but dies on any
other error, so the ``--preload`` modules and those found in the script (``auto``) come through
here: each is imported with every error ignored (the worker imports it again and shows the real
error). The list arrives in ``DISTRAIN_PRELOAD_SCRIPT_IMPORTS``, removed at once so no worker
inherits it.
A module imported here may list modules it imports lazily in ``DISTRAIN_PRELOAD`` (e.g.
``distrain.data.datasets`` names scikit-learn): they are imported too.
If an import initialised CUDA (which a forked child cannot use), say which one and how to avoid it.

Last, ``gc.freeze()``: the preloaded objects (hundreds of MB of torch, scipy, ...) move to the
gc's permanent generation, so a worker's collections never walk them. Without it each
``gc.collect()`` in a worker (``distrain.cleanup()`` runs two) would touch every preloaded
object and copy the pages it touched out of the shared, copy-on-write memory.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys

from distrain.env import scoped_environ
from distrain.signals import SCHEDULER_STOP_SIGNALS, install

ENV = "DISTRAIN_PRELOAD_SCRIPT_IMPORTS"


def _import_all(names: list[str]) -> None:
    pending = list(names)
    while pending:
        name = pending.pop(0)
        try:
            module = importlib.import_module(name)
        except BaseException:  # anything: the worker imports it again and reports it
            continue
        # A module may name what it imports lazily (optional dependencies) for the server to load.
        lazy = getattr(module, "DISTRAIN_PRELOAD", ())
        pending.extend(str(extra) for extra in lazy if extra not in sys.modules)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            print(f"distrain: importing {name} in the fast-start server initialised CUDA, which "
                  "forked workers cannot use; pass --preload torch (or --start-method spawn)",
                  file=sys.stderr, flush=True)
            return


def _preload_keeping_environ(names: list[str]) -> None:
    """Import ``names``, then undo what they did to the environment: scikit-learn, for one, sets
    KMP_DUPLICATE_LIB_OK at import, and workers must start with exactly the launcher's
    environment, as under torchrun (a worker that imports such a module finds it loaded, so
    the module's import-time ``os.environ`` changes are not made in the worker)."""
    with scoped_environ({}):
        _import_all(names)


_preload_keeping_environ([name for name in os.environ.pop(ENV, "").split(",") if name])
gc.collect()  # what the imports left as garbage is freed now, not frozen with the rest
gc.freeze()
# A scheduler that signals every process of the job (SLURM's step signal, kill -TERM -PGID) must
# not end the server first: torch's spawn wrapper gives each worker PR_SET_PDEATHSIG=SIGINT, so
# the server's death would interrupt workers saving on SIGTERM. The launcher stops the server
# itself; each worker puts the default back before its script runs (preload.run_script).
install(SCHEDULER_STOP_SIGNALS, signal.SIG_IGN)
