"""Preloaded into the fast-start server by a test: holds the server's second fork at a gate.

The launcher then sits in torch elastic's worker start (waiting for rank 1's pid) while rank 0
already runs: the window in which a stop signal used to leave workers behind. The test opens the
gate (a FIFO named by $FORK_GATE) after it has sent the signal.
"""

import os
from pathlib import Path

_GATE = os.environ.get("FORK_GATE", "")
_forks = 0


def _hold_second_fork() -> None:
    global _forks
    _forks += 1
    if _GATE and _forks == 2:
        Path(_GATE + ".waiting").write_text(str(os.getpid()))
        with open(_GATE) as gate:  # blocks until the test opens the FIFO for writing
            gate.read()


os.register_at_fork(before=_hold_second_fork)
