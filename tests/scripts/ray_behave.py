"""A worker for the Ray launcher tests whose behaviour is its first argument. No torch: cheap.

  env OUT      write this rank's environment and argv to OUT/env-<rank>.json
  term         print "ready"; rank 0 exits 0 on SIGTERM or SIGINT (printing "got SIG..."), the
               other ranks ignore both (the launcher must SIGKILL them after the grace period)
  raise        rank 1 raises ValueError; the others block until the launcher stops them
  abort        the shape of the gloo teardown abort: terminate line, then SIGABRT
  hold         print "holding" and block until the launcher stops this rank
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

mode = sys.argv[1]
rank = int(os.environ["RANK"])


def block() -> None:
    while True:
        signal.pause()  # woken only by a signal


if mode == "env":
    out = Path(sys.argv[2])
    env = dict(os.environ)
    env["__argv__"] = json.dumps(sys.argv[1:])
    env["__name__"] = __name__
    env["__cwd__"] = os.getcwd()
    (out / f"env-{rank}.json").write_text(json.dumps(env, sort_keys=True))
elif mode == "term":
    for sig in (signal.SIGTERM, signal.SIGINT):
        if rank == 0:
            def on_signal(signum: int, frame: object) -> None:
                print(f"got {signal.Signals(signum).name}, saving and exiting", flush=True)
                sys.exit(0)

            signal.signal(sig, on_signal)
        else:
            signal.signal(sig, signal.SIG_IGN)
    print("ready", flush=True)
    block()
elif mode == "raise":
    print(f"rank {rank} started", flush=True)
    if rank == 1:
        raise ValueError("boom from rank 1")
    block()
elif mode == "abort":
    print("training done", flush=True)
    sys.stderr.write("terminate called without an active exception\n")
    sys.stderr.flush()
    os.abort()
elif mode == "hold":
    print("holding", flush=True)
    block()
else:
    sys.exit(f"unknown mode {mode!r}")
