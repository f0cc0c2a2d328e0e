"""The launcher interface: one method, ``launch(config) -> RunResult``."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distrain.launch import LaunchConfig, RankFailure, RunResult

TEARDOWN_ABORT_LINE = "terminate called without an active exception"
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):", re.MULTILINE)
SIGABRT_EXIT = -6
# What the launchers forward to workers (torchrun's TORCHELASTIC_SIGNALS_TO_HANDLE).
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


class Launcher(ABC):
    """Starts the workers of one job and waits for them."""

    @abstractmethod
    def launch(self, config: LaunchConfig) -> RunResult:
        """Run the job described by ``config``; never leaves a worker process behind."""


def is_teardown_abort(exitcode: int, signal_name: str | None, log_text: str) -> bool:
    """The gloo teardown abort: SIGABRT with C++'s terminate message and no Python traceback.

    A script that raised shows a traceback; one that returned and then aborted during
    interpreter finalization shows only the terminate line. The run still counts as failed.
    """
    aborted = exitcode == SIGABRT_EXIT or signal_name == "SIGABRT"
    return aborted and TEARDOWN_ABORT_LINE in log_text and not _TRACEBACK.search(log_text)


# What gloo and NCCL print when a collective outlives the process group's timeout. gloo says
# either, depending on which of its threads noticed first.
_COLLECTIVE_TIMEOUT = re.compile(
    r"Timed out waiting \d+ms|Application timeout caused pair closure"
    r"|Watchdog caught collective operation timeout|ProcessGroupNCCL.*[Tt]imeout"
)


def is_collective_timeout(log_text: str) -> bool:
    """The rank failed because a collective did not complete within the group's timeout."""
    return bool(_COLLECTIVE_TIMEOUT.search(log_text))


# What a rank prints when a peer process went away under it (gloo, NCCL): a consequence.
_PEER_LOST = re.compile(
    r"Connection reset by peer|Connection closed by peer|remote process exited"
    r"|NCCL communicator was aborted"
)


def is_peer_lost(log_text: str) -> bool:
    """The rank failed because a peer's connection went away (that peer failed first)."""
    return bool(_PEER_LOST.search(log_text))


# gloo names the peer of a failed read/write: "Read error [10.0.0.2]:41322: Connection reset ...".
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:\d+")


def lost_peer(log_text: str) -> str | None:
    """``"host1 (10.0.0.2)"``: the host whose connection the rank lost, as this machine names it."""
    for line in reversed(log_text.splitlines()):
        if not _PEER_LOST.search(line):
            continue
        found = _PEER_ADDRESS.search(line)
        if found is None:
            return None
        address = found.group(1).removeprefix("::ffff:")
        if _is_own_address(address):
            return None  # a peer on this machine: its own failure is reported with it
        try:
            name = socket.gethostbyaddr(address)[0]
        except OSError:
            return address
        return f"{name} ({address})" if name != address else address
    return None


def _is_own_address(address: str) -> bool:
    """This machine can bind ``address``: it is one of its own (loopback included)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def causes_first(failures: Sequence[RankFailure]) -> tuple[RankFailure, ...]:
    """Ranks that failed on their own before those that only lost a peer; otherwise as given.

    When a rank raises, its peers' collectives fail within microseconds, and a peer can record
    its error (and exit) before the rank that caused it: time alone does not find the cause.
    """
    return tuple(sorted(failures, key=lambda failure: failure.peer_lost))


def tail_text(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


@contextlib.contextmanager
def restored_signal_handlers() -> Iterator[None]:
    """Give a Python caller of ``launch``/``run`` its own handlers back afterwards.

    torch elastic's agent installs handlers that raise SignalException, and Ray's driver one
    that exits; both stay installed after the launch returns unless put back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: installed outside Python, nothing to put back
                signal.signal(sig, handler)
