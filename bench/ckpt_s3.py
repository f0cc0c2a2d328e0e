"""Checkpoints on S3: upload throughput and async stall, against moto's S3 server on 127.0.0.1.

    python bench/ckpt_s3.py                  # 5 interleaved repetitions
    python bench/ckpt_s3.py --reps 3

The state of bench/ckpt_stall.py (an MLP and its SGD momentum, ~200 MB), one process.

* **Throughput**: a synchronous ``Checkpointer("s3://...").save`` (serialize, digest, upload
  every object in parallel parts, manifest, ``latest``) against s3fs's own ``put`` of the same
  files (already on disk: it only uploads), interleaved. Goal: >= 0.9 of s3fs.
* **Stall**: a segment of training steps with one save after the first step, blocking
  (``Checkpointer(s3, async_save=False)``) or async (``async_save=True``: the CPU snapshot is the
  only pause; upload on a thread; ``wait()`` at the end counts). Goal: async <= 0.10 of blocking.
  The segment (48 steps, about 4 s here) is long enough for the upload to finish in the
  background, as it does between two saves of a real run; when it does not, the rest of the
  upload is part of the final ``wait()`` and counts as stopped.

moto's server runs in a process of its own (``python -m tests.helpers.s3server``): in this one,
its request handling would compete with the client's threads for this interpreter's GIL. It
still shares the 2 cores, so the absolute MB/s say little; the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python bench/ckpt_s3.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ckpt_stall import build_state, state_bytes, train_segment
from bench.common import goal_mark, interleave, load_note, median, table
from distrain import ddp
from distrain.ckpt import Checkpointer
from tests.helpers import REPO, free_port, wait_for_files

THROUGHPUT_GOAL, STALL_GOAL = 0.9, 0.10


def throughput(bucket: str, local: Path, reps: int) -> dict[str, Any]:
    import s3fs

    model, optimizer = build_state()
    train_segment(model, optimizer, 1, None, None)
    ctx = ddp.init()
    Checkpointer(local, ctx).save(1, model=model, optimizer=optimizer)  # what s3fs uploads
    files = sorted(p for p in (local / "step-00000001").iterdir() if p.is_file())
    written = sum(p.stat().st_size for p in files)
    fs = s3fs.S3FileSystem()
    counter = iter(range(10_000))

    def save() -> float:
        ckpt = Checkpointer(f"s3://{bucket}/ckpt-{next(counter)}", ctx, keep_last=None)
        start = time.perf_counter()
        ckpt.save(1, model=model, optimizer=optimizer)
        return time.perf_counter() - start

    def put() -> float:
        target = f"{bucket}/put-{next(counter)}/"
        start = time.perf_counter()
        fs.put([str(p) for p in files], target)
        return time.perf_counter() - start

    times = interleave(reps, {"ckpt": save, "s3fs": put})
    ratio = median([p / c for p, c in zip(times["s3fs"], times["ckpt"])])  # same bytes: time ratio
    return {"bytes": written, "ckpt_s": times["ckpt"], "s3fs_s": times["s3fs"],
            "ckpt_mb_s": round(written / 2**20 / median(times["ckpt"]), 1),
            "s3fs_mb_s": round(written / 2**20 / median(times["s3fs"]), 1), "ratio": round(ratio, 3)}


def stall(bucket: str, reps: int, steps: int) -> dict[str, Any]:
    model, optimizer = build_state()
    train_segment(model, optimizer, 2, None, None)
    ctx = ddp.init()
    blocking = Checkpointer(f"s3://{bucket}/blocking", ctx, keep_last=1)
    background = Checkpointer(f"s3://{bucket}/async", ctx, keep_last=1, async_save=True)
    counter = iter(range(1, 10_000))
    sides: dict[str, tuple[Callable[[], None], Callable[[], None] | None]] = {
        "blocking": (lambda: blocking.save(next(counter), model=model, optimizer=optimizer), None),
        "async": (lambda: background.save(next(counter), model=model, optimizer=optimizer),
                  background.wait),
    }
    blocked: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for rep in range(reps):
        for name in names[rep % 2:] + names[:rep % 2]:
            _, paused = train_segment(model, optimizer, steps, *sides[name])
            blocked[name].append(paused)
    ratio = median([a / b for a, b in zip(blocked["async"], blocked["blocking"])])
    return {"bytes": state_bytes(model, optimizer), "steps": steps, "blocked_s": blocked,
            "median_blocked_s": {k: round(median(v), 3) for k, v in blocked.items()},
            "ratio": round(ratio, 3)}


@contextlib.contextmanager
def s3_process(local: Path) -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1, in a process of its own; its URL."""
    ready = local / "s3-ready"
    server = subprocess.Popen([sys.executable, "-m", "tests.helpers.s3server", "--port", str(free_port()),
                               "--ready", str(ready)], cwd=REPO, stdout=subprocess.DEVNULL, text=True)
    try:
        wait_for_files([ready], server)
        yield ready.read_text().strip()
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_bench(reps: int = 5, *, steps: int = 48) -> dict[str, Any]:
    import s3fs

    from tests.helpers.s3server import CREDENTIALS

    local = Path(tempfile.mkdtemp(prefix="bench-ckpt-s3-"))
    note_before = load_note()
    saved_env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    try:
        with s3_process(local) as url:
            os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": url})
            bucket = "bench"
            s3fs.S3FileSystem().mkdir(bucket)
            written = throughput(bucket, local, reps)
            stalled = stall(bucket, reps, steps)
    finally:
        shutil.rmtree(local, ignore_errors=True)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    note = f"{note_before} before, {load_note()} after"
    size = written["bytes"] / 2**20
    print(table(f"S3 upload throughput: {size:.0f} MB full checkpoint to moto on 127.0.0.1, MB/s, "
                f"median of {reps} ({note})",
                ["Checkpointer.save (sync, s3://)", "s3fs put", "ratio", "goal"],
                [[written["ckpt_mb_s"], written["s3fs_mb_s"], written["ratio"],
                  goal_mark(written["ratio"], THROUGHPUT_GOAL, at_most=False)]]), flush=True)
    print(table(f"S3 checkpoint stall: {stalled['bytes'] / 2**20:.0f} MB of state, seconds training "
                f"stopped, median of {reps}",
                ["blocking save", "async save (+ final wait)", "async/blocking", "goal"],
                [[stalled["median_blocked_s"]["blocking"], stalled["median_blocked_s"]["async"],
                  stalled["ratio"], goal_mark(stalled["ratio"], STALL_GOAL, at_most=True)]]), flush=True)
    return {"reps": reps, "load": note, "throughput": written, "stall": stalled}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=48, help="training steps per timed segment")
    args = parser.parse_args(argv)
    run_bench(args.reps, steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
