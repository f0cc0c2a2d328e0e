"""How the launchers read a failed rank's output: no processes started.

The texts are what gloo, NCCL and CPython really print (copied from failed runs on this stack);
the end-to-end versions are in test_fault_trials.py (a stuck rank) and test_teardown.py.
"""

from __future__ import annotations

import pytest

from distrain.launch import RankFailure
from distrain.results import causes_first, is_collective_timeout, is_peer_lost, is_teardown_abort

GLOO_TRACE = ('Traceback (most recent call last):\n  File "train.py", line 100, in main\n'
              "    loss.backward()\n")


@pytest.mark.parametrize("line", [
    # gloo: which of the two depends on which gloo thread noticed first (both seen in CI)
    "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms"
    " for recv operation to complete",
    "RuntimeError: Application timeout caused pair closure",
    "[rank0]:[E ProcessGroupNCCL.cpp:616] [Rank 0] Watchdog caught collective operation timeout:"
    " WorkNCCL(SeqNum=12, OpType=ALLREDUCE, Timeout(ms)=5000) ran for 5003 milliseconds",
])
def test_collective_timeouts_are_recognised_and_explained(line: str) -> None:
    text = GLOO_TRACE + line
    assert is_collective_timeout(text)
    failure = RankFailure(rank=0, local_rank=0, exitcode=1, signal=None, node="n", log_tail=text,
                          collective_timeout=is_collective_timeout(text))
    described = failure.describe()
    assert described.startswith("rank 0 (local rank 0 on n) failed: exit code 1\n  Its collective timed out")
    assert "ddp.init(timeout=...)" in described and line in described


def test_an_ordinary_error_is_neither_a_timeout_nor_a_teardown_abort() -> None:
    text = GLOO_TRACE + "RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x3 and 4x2)"
    assert not is_collective_timeout(text)
    assert not is_teardown_abort(1, None, text)
    assert "timed out" not in RankFailure(rank=1, local_rank=1, exitcode=1, signal=None, node="n",
                                          log_tail=text).describe()


def test_the_teardown_abort_needs_sigabrt_the_terminate_line_and_no_traceback() -> None:
    line = "terminate called without an active exception"
    assert is_teardown_abort(-6, None, line)
    assert is_teardown_abort(1, "SIGABRT", line)
    assert not is_teardown_abort(1, None, line)  # not an abort
    assert not is_teardown_abort(-6, None, GLOO_TRACE + line)  # the script raised first


PEER_RESET = ("RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
              "[127.0.0.1]:40841: Connection reset by peer. This is typically caused by a remote worker "
              "hanging or bugs in the application.")


def test_a_rank_that_only_lost_its_peer_is_listed_after_the_cause() -> None:
    lost = RankFailure(rank=0, local_rank=0, exitcode=1, signal=None, node="n",
                       log_tail=GLOO_TRACE + PEER_RESET, peer_lost=is_peer_lost(PEER_RESET))
    cause_text = GLOO_TRACE + "RuntimeError: rank 1 fails on purpose"
    cause = RankFailure(rank=1, local_rank=1, exitcode=1, signal=None, node="n",
                        log_tail=cause_text, peer_lost=is_peer_lost(cause_text))
    # rank 0 recorded its error first (its barrier failed the moment rank 1 left the group)
    assert causes_first([lost, cause]) == (cause, lost)
    assert causes_first([cause, lost]) == (cause, lost)
    assert "lost its connection to a peer" in lost.describe()
    assert "peer" not in cause.describe()
