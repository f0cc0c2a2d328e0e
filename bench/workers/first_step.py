"""Start-up benchmark worker: stamps when this rank passed its first barrier and its first step.

    <launcher> bench/workers/first_step.py OUT barrier
    <launcher> bench/workers/first_step.py OUT digits -- DIGITS_ARGS...

Imports only torch, then ``init_process_group`` + ``barrier`` and writes ``OUT/barrier-rank<R>``
(the wall clock, ``time.time()``); ``barrier`` mode then leaves. ``digits`` mode then runs
examples/digits_ddp.py unchanged as ``__main__`` (its ``ddp.init`` joins the group made here)
with a global optimizer hook that writes ``OUT/step-rank<R>`` after the first optimizer step and
then ends the run (``distrain.ddp.cleanup()``, the example's own exit path, then exit 0). The
file runs unchanged under torchrun and distrain launch alike.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits_ddp.py"


def stamp(out: Path, what: str) -> None:
    now = time.time()
    path = out / f"{what}-rank{os.environ['RANK']}"
    temp = path.with_name(f".{path.name}")
    temp.write_text(repr(now))
    os.replace(temp, path)


def main() -> None:
    out, mode, rest = Path(sys.argv[1]), sys.argv[2], sys.argv[4:]
    dist.init_process_group("gloo")
    dist.barrier()
    stamp(out, "barrier")
    if mode == "barrier":
        dist.barrier()
        dist.destroy_process_group()
        return
    fired: list[bool] = []

    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not fired:
            fired.append(True)
            stamp(out, "step")
            # Measured: leave now rather than evaluate, checkpoint and log. The example's own
            # ddp.cleanup() releases its DDP wrapper and the group first (no teardown abort).
            from distrain import ddp

            ddp.cleanup()
            sys.exit(0)

    register_optimizer_step_post_hook(after_step)
    sys.argv = [str(EXAMPLE), *rest]
    runpy.run_path(str(EXAMPLE), run_name="__main__")


if __name__ == "__main__":
    main()
