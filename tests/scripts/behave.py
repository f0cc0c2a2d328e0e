"""A worker whose behaviour is chosen by $BEHAVE (ok, exit3, raise, sigkill, sigterm, restart, abort...)."""

import os
import signal
import sys
from pathlib import Path

out = Path(os.environ.get("OUT_DIR", "."))
rank = int(os.environ["RANK"])
(out / f"pid-{rank}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}").write_text(str(os.getpid()))
mode = os.environ.get("BEHAVE", "ok")
bad_rank = int(os.environ.get("BAD_RANK", "1"))
print(f"worker {rank} starting in mode {mode}", flush=True)


def wait_forever() -> None:
    # Blocks in the kernel; woken only by a signal. No busy loop, no sleep-polling for results.
    while True:
        signal.pause()


if mode == "sigterm":
    def on_term(signum: int, frame: object) -> None:
        (out / f"got-sigterm-{rank}").write_text("saved")
        print(f"rank {rank} got SIGTERM, saving", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    (out / f"ready-{rank}").write_text("1")
    wait_forever()
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    (out / f"ready-{rank}").write_text("1")
    wait_forever()
if mode == "restart":
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and rank == bad_rank:
        print("failing on the first attempt", flush=True)
        sys.exit(1)
    print(f"rank {rank} ok on attempt {os.environ['TORCHELASTIC_RESTART_COUNT']}", flush=True)
    sys.exit(0)
if rank != bad_rank:
    if mode == "ok":
        sys.exit(0)
    wait_forever()  # the healthy ranks wait; the launcher must stop them
if mode == "exit3":
    print("rank is giving up with exit code 3", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "raise":
    raise ValueError("boom from the bad rank")
if mode == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "abort":
    # The shape of the gloo teardown abort: script done, then C++ terminate -> SIGABRT.
    sys.stderr.write("terminate called without an active exception\n")
    sys.stderr.flush()
    os.abort()
if mode == "raise-abort":
    try:
        raise RuntimeError("a real error")
    except RuntimeError:
        import traceback

        traceback.print_exc()
    sys.stderr.write("terminate called without an active exception\n")
    sys.stderr.flush()
    os.abort()
sys.exit(0)
