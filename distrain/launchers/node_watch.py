"""Notice a node that went silent (killed or cut off) and restart this node's workers without it.

A node whose link goes down while its processes run on leaves the others blocked in their next
collective until it times out (gloo's default: 30 minutes). torch's c10d rendezvous already
knows sooner: every agent writes a keep-alive heartbeat into the rendezvous state
(``keep_alive_interval``), but nothing acts on a silent participant while the workers run.

:class:`NodeWatch` reads that state (its own client of the rendezvous store, twice a second)
and, when a participant of the current round has not renewed its heartbeat for
:func:`silent_after` seconds, SIGKILLs this node's workers: the agent sees the group fail and
restarts it (``--max-restarts``), and the next round forms without the silent node. Silence is
timed with this host's monotonic clock from when a heartbeat last *changed*, so clock skew
between hosts does not matter. Nothing happens once the rendezvous is closed (a job ending), in
a round this node is not part of, or for a node that rejoins (it beats again).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any

from distrain.launchers.recovery import KEEP_ALIVE_INTERVAL_S, KEEP_ALIVE_MAX_ATTEMPT

POLL_S = 0.5
MIN_SILENT_S = 8.0  # an agent on a loaded machine can go a few seconds without running
STORE_TIMEOUT_S = 5.0
SENTINEL = b"Y2FuaW1hZGFt"  # what torch's c10d backend stores before the first round
log = logging.getLogger(__name__)


def silent_after(conf: Mapping[str, Any]) -> float:
    """Seconds without a new heartbeat after which a node counts as lost: one beat more than
    torch allows before it drops the node from the round (a node torch keeps is never cut), and
    at least :data:`MIN_SILENT_S` (stopping workers is not harmless, unlike torch's dropping)."""
    interval = float(conf.get("keep_alive_interval", KEEP_ALIVE_INTERVAL_S))
    attempts = int(conf.get("keep_alive_max_attempt", KEEP_ALIVE_MAX_ATTEMPT))
    return max(MIN_SILENT_S, interval * (attempts + 1))


def watched(backend: str, endpoint: str, max_nodes: int, conf: Mapping[str, Any]) -> bool:
    """Whether a launch has other nodes to watch: a c10d rendezvous over a TCP store."""
    return (backend == "c10d" and max_nodes > 1 and bool(endpoint)
            and str(conf.get("store_type", "tcp")).lower() == "tcp")


class NodeWatch:
    """Watches the rendezvous ``run_id`` at ``endpoint``; ``stop_workers`` stops this node's workers."""

    def __init__(self, *, endpoint: str, run_id: str, local_addr: str | None, silent_s: float,
                 stop_workers: Callable[[], Iterable[int]]) -> None:
        from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

        self.host, self.port = parse_rendezvous_endpoint(endpoint, default_port=29400)
        self.key = "torch.rendezvous." + run_id
        self.me = (local_addr or socket.getfqdn(), os.getpid())  # how the agent names this node
        self.silent_s = silent_s
        self.stop_workers = stop_workers
        self.lost: list[str] = []  # hosts declared lost, for the failure summary
        self._store: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distrain-node-watch", daemon=True)

    # ------------------------------------------------------------------ reading the state

    def _state(self) -> Any | None:
        """The rendezvous state as the agents wrote it; None when unreadable or not there yet."""
        from base64 import b64decode

        from torch.distributed import TCPStore

        try:
            if self._store is None:
                self._store = TCPStore(self.host, self.port, is_master=False,
                                       timeout=timedelta(seconds=STORE_TIMEOUT_S))
            if not self._store.check([self.key]):
                return None
            value = self._store.get(self.key)
            return None if value == SENTINEL else pickle.loads(b64decode(value))
        except Exception:  # the store unreachable, or the sentinel before the first round
            self._store = None
            return None

    def _is_me(self, node: Any) -> bool:
        return (node.addr, node.pid) == self.me

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        round_seen = -1
        beats: dict[Any, tuple[Any, float]] = {}  # node -> (its heartbeat, when it last changed)
        while not self._stop.wait(POLL_S):
            state = self._state()
            if state is None:
                continue
            mine = state.complete and not state.closed and any(map(self._is_me, state.participants))
            if not mine or state.round != round_seen:
                round_seen, beats = (state.round if mine else -1), {}
                if mine:  # a new round of ours: its other participants, beating from now on
                    now = time.monotonic()
                    beats = {n: (state.last_heartbeats.get(n), now)
                             for n in state.participants if not self._is_me(n)}
                continue
            now = time.monotonic()
            for node, (beat, _) in list(beats.items()):
                current = state.last_heartbeats.get(node)
                if current is not None and current != beat:
                    beats[node] = (current, now)
            silent = [node for node, (_, changed) in beats.items() if now - changed > self.silent_s]
            if silent:
                self._on_lost(silent)
                round_seen = state.round  # once per round: the agent restarts into a new one
                beats = {}

    def _on_lost(self, nodes: list[Any]) -> None:
        names = sorted({node.addr for node in nodes})
        self.lost += names
        stopped = sorted(self.stop_workers())
        print(f"distrain: lost node {', '.join(names)}: no rendezvous heartbeat for "
              f"{self.silent_s:g} s (killed or unreachable); stopped this node's workers "
              f"({len(stopped)}) so that the group restarts without it", file=sys.stderr, flush=True)

    def lost_line(self) -> str:
        """One line for the failure summary naming the nodes this watch declared lost."""
        if not self.lost:
            return ""
        return (f"distrain: lost node {', '.join(self.lost)}: no rendezvous heartbeat for "
                f"{self.silent_s:g} s (killed or unreachable)")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=STORE_TIMEOUT_S * 3)
        self._store = None


def kill_all(pids: Iterable[int]) -> list[int]:
    """SIGKILL ``pids`` (workers blocked in a collective do not run a SIGTERM handler)."""
    killed = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


@contextlib.contextmanager
def watching_nodes(*, backend: str, endpoint: str, run_id: str, max_nodes: int,
                   conf: Mapping[str, Any], local_addr: str | None,
                   workers: Callable[[], Iterable[int]]) -> Iterator[NodeWatch | None]:
    """A started :class:`NodeWatch` for a multi-node c10d launch (None otherwise)."""
    if not watched(backend, endpoint, max_nodes, conf):
        yield None
        return
    watch = NodeWatch(endpoint=endpoint, run_id=run_id, local_addr=local_addr,
                      silent_s=silent_after(conf), stop_workers=lambda: kill_all(workers()))
    watch.start()
    try:
        yield watch
    finally:
        watch.stop()
