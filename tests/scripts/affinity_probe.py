"""Each rank writes OUT_DIR/affinity-RANK.json: its CPU mask after ddp.init, that of a thread it
started before ddp.init, that of a thread started after it, that of a BackgroundWriter job (any
core of the node), and the launcher's CPU list."""

import json
import os
import threading
from pathlib import Path

from distrain import ddp
from distrain.ckpt.background import BackgroundWriter

before = threading.Event()
early = threading.Thread(target=before.wait, name="started-before-init")
early.start()
ctx = ddp.init()
after_mask: list[int] = []


def record_after() -> None:
    after_mask.extend(sorted(os.sched_getaffinity(0)))


after = threading.Thread(target=record_after)
after.start()
after.join()
background: list[int] = []  # distrain's own low-priority threads may use every core
writer = BackgroundWriter(what="affinity probe")
writer.submit(lambda: background.extend(sorted(os.sched_getaffinity(0))))
writer.wait()
assert early.native_id is not None
report = {"main": sorted(os.sched_getaffinity(0)), "early": sorted(os.sched_getaffinity(early.native_id)),
          "late": after_mask, "node": os.environ.get("DISTRAIN_CPU_AFFINITY"),
          "local_rank": ctx.local_rank, "background": background}
before.set()
early.join()
ddp.barrier()
Path(os.environ["OUT_DIR"], f"affinity-{ctx.rank}.json").write_text(json.dumps(report))
ddp.cleanup()
