"""What a launch returns (``RunResult``, ``RankFailure``) and how a rank's failure is classified.

Both launchers (local and Ray) build their failures with :func:`classify`, so a failure reads
the same whichever started the rank. A leaf module: nothing here imports the launchers.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TEARDOWN_ABORT_LINE = "terminate called without an active exception"
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):", re.MULTILINE)
SIGABRT_EXIT = -6


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


@dataclass(frozen=True, slots=True, kw_only=True)
class RankFailure:
    """Why one rank failed."""

    rank: int
    local_rank: int
    exitcode: int
    signal: str | None
    node: str
    log_tail: str
    teardown_abort: bool = False
    collective_timeout: bool = False  # its output shows a gloo/NCCL collective timeout
    peer_lost: bool = False  # its output shows a peer's connection going away
    lost_peer: str | None = None  # the host it lost, when the output names it: "host1 (10.0.0.2)"
    raised: bool = False  # it recorded an uncaught exception of its own (then may have been stopped)

    def describe(self) -> str:
        how = f"killed by {self.signal}" if self.signal else f"exit code {self.exitcode}"
        if self.raised and self.signal:
            how = f"raised an exception (then stopped by {self.signal} while exiting)"
        head = f"rank {self.rank} (local rank {self.local_rank} on {self.node}) failed: {how}"
        if self.teardown_abort:
            head += (
                "\n  This is the gloo teardown abort: the script finished, then the process "
                "aborted at interpreter exit because its process group outlived "
                "destroy_process_group(). Fix: call distrain.ddp.cleanup() at the end of the "
                "script (plain torch: `import torch.distributed.nn` before init_process_group(), "
                "`del model` before destroy_process_group()); see docs/troubleshooting.md."
            )
        if self.collective_timeout:
            head += (
                "\n  Its collective timed out: another rank did not join the same collective "
                "within the process group timeout (stuck, far slower, or dead). Look for the rank "
                "that was not in it; raise ddp.init(timeout=...) only if ranks are legitimately "
                "that slow (e.g. rank 0 writing a large checkpoint); see README 'Troubleshooting'."
            )
        elif self.peer_lost and self.lost_peer:
            head += (f"\n  It lost its connection to a peer on {self.lost_peer}: that host, or a "
                     "rank on it, went away first (killed, crashed or unreachable).")
        elif self.peer_lost:
            head += ("\n  It lost its connection to a peer: usually a consequence of another "
                     "rank failing (listed first when distrain saw it fail).")
        return self.with_output(head)

    def with_output(self, head: str) -> str:
        """``head`` followed by the last lines of the rank's output, indented."""
        if not self.log_tail:
            return head
        tail = "\n".join("    " + line for line in self.log_tail.rstrip().splitlines())
        return f"{head}\n  last lines of its output:\n{tail}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """The outcome of a launch: return values (functions) or exit codes, keyed by global rank."""

    return_values: Mapping[int, Any]
    failures: tuple[RankFailure, ...] = ()
    signal: str | None = None
    restarts: int = 0
    log_dir: str | None = None
    diagnosis: str = ""  # what the hang watch found (stuck rank first), when it stopped the run

    @property
    def ok(self) -> bool:
        return not self.failures and self.signal is None

    def summary(self) -> str:
        if self.signal:
            return f"distrain: stopped by {self.signal}; workers were asked to stop first."
        if not self.failures:
            return f"distrain: all {len(self.return_values)} local ranks finished successfully."
        lost = {f.lost_peer for f in self.failures if f.peer_lost and f.lost_peer}
        also = f"; lost contact with {', '.join(sorted(lost))}" if lost else ""
        lines = [self.diagnosis] if self.diagnosis else []
        lines += [f"distrain: the job failed ({len(self.failures)} rank(s){also}):"]
        lines += [f.describe() for f in self.failures]
        return "\n".join(lines)


def classify(
    *,
    rank: int,
    local_rank: int,
    exitcode: int,
    signal: str | None,
    node: str,
    log_tail: str,
    output: str,
    raised: bool = False,
    name_lost_peer: bool = True,
) -> RankFailure:
    """The :class:`RankFailure` of a rank, its causes read from ``output`` (the rank's whole log).

    Args:
        rank: Global rank.
        local_rank: Rank on its node.
        exitcode: Process exit code (negative: killed by a signal).
        signal: Name of the signal that killed it, if any.
        node: Host name of the rank's node.
        log_tail: Last lines of its output, shown in the summary.
        output: All of its output that is at hand; the causes are looked for there.
        raised: Whether it recorded an uncaught exception of its own.
        name_lost_peer: Look up which host it lost (a reverse DNS lookup) when it lost a peer.

    Returns:
        The failure, with the teardown abort, collective timeout and lost peer recognised.
    """
    return RankFailure(
        rank=rank,
        local_rank=local_rank,
        exitcode=exitcode,
        signal=signal,
        node=node,
        log_tail=log_tail,
        teardown_abort=is_teardown_abort(exitcode, signal, output),
        collective_timeout=is_collective_timeout(output),
        peer_lost=is_peer_lost(output),
        lost_peer=lost_peer(output) if name_lost_peer else None,
        raised=raised,
    )
