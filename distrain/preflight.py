"""Start-up checks of every host before training: can it use the checkpoint store, reach the endpoint?

On a real cluster the first thing to break is usually not the model: one node lacks the store's
credentials, or its firewall drops the rendezvous port. Both show up late and far from the cause
(a checkpoint save that fails after an hour, a rendezvous that waits and times out). Here each
host checks itself at start-up and a host that fails is named in one line with the fix:

* in a training script, after ``ddp.init()``: ``check_hosts(ctx, store="s3://bucket/run")``; one
  rank per host writes, reads back and deletes a small object under the store, the results are
  gathered, and every rank raises :class:`PreflightError` naming each failing host before any
  training step;
* on a host, before launching: ``python -m distrain.preflight --store URL --rdzv-endpoint HOST:PORT``
  (exit code 2 and one line per problem; 0 when all is well).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distrain.context import Context

STORE_FIX = ("give this host the store's credentials and endpoint (AWS_* variables or "
             "storage_options=), or a path every host can write")
ENDPOINT_FIX = ("start node 0 first and check that this host resolves its name and that the port "
                "is open between the hosts")


class PreflightError(RuntimeError):
    """One or more hosts cannot run the job; the message names each one and the fix."""


def store_problem(store: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """Why this host cannot write, read back and delete an object under ``store``; None if it can."""
    from distrain.ckpt.remote import Remote, RetryPolicy, is_url

    probe = f".distrain-preflight-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    data = b"distrain preflight\n"
    try:
        if is_url(store):
            remote = Remote(store, storage_options, retry=RetryPolicy(attempts=2, deadline=15.0))
            url = store.rstrip("/") + "/" + probe
            remote.put(url, data)
            try:
                if remote.get(url) != data:
                    return f"cannot use the checkpoint store {store}: an object read back differs"
            finally:
                remote.remove(url)
        else:
            root = Path(store)
            root.mkdir(parents=True, exist_ok=True)
            path = root / probe
            path.write_bytes(data)
            try:
                if path.read_bytes() != data:
                    return f"cannot use the checkpoint store {store}: a file read back differs"
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()
    except Exception as error:  # any failure of the store is the answer, not a crash
        reason = " ".join(str(error).split()) or type(error).__name__
        return f"cannot write the checkpoint store {store} ({reason}); fix: {STORE_FIX}"
    return None


def endpoint_problem(endpoint: str, timeout: float = 10.0) -> str | None:
    """Why this host cannot open a TCP connection to ``HOST:PORT``; None if it can."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        return f"rendezvous endpoint {endpoint!r} is not HOST:PORT; fix: e.g. --rdzv-endpoint node0:29400"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        return f"cannot reach the rendezvous endpoint {endpoint} ({reason}); fix: {ENDPOINT_FIX}"


def check_hosts(ctx: Context, *, store: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Every host checks ``store`` (one rank per host); all ranks raise if any host failed.

    Collective: call it on every rank, after ``ddp.init()`` and before the first step."""
    problem = store_problem(store, storage_options) if ctx.local_rank == 0 else None
    mine = (socket.gethostname(), problem)
    if ctx.world_size > 1:
        import torch.distributed as dist

        found: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(found, mine)
    else:
        found = [mine]
    failed = {host: why for host, why in found if why}
    if failed:
        lines = (f"preflight: host {host} {why}" for host, why in sorted(failed.items()))
        raise PreflightError("; ".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distrain.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="checkpoint root (path or URL) this host must be able to write")
    parser.add_argument("--rdzv-endpoint", help="HOST:PORT this host must be able to reach")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the endpoint")
    args = parser.parse_args(argv)
    store = store_problem(args.store) if args.store else None
    endpoint = endpoint_problem(args.rdzv_endpoint, args.timeout) if args.rdzv_endpoint else None
    problems = [p for p in (store, endpoint) if p]
    for problem in problems:
        print(f"preflight: host {socket.gethostname()} {problem}", file=sys.stderr)
    if not problems:
        print(f"preflight: host {socket.gethostname()} ok")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
