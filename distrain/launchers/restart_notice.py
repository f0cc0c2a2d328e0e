"""One console line per group restart: ``distrain: restart 1 of 3: rank 1 killed by SIGKILL``.

torch's elastic agent restarts a failed worker group silently (an INFO record on its own logger);
this handler sits on that logger for the duration of a launch and turns that record into one
line naming the restart, the rank that failed first and why.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distrain.results import RankFailure

AGENT_LOGGER = "torch.distributed.elastic.agent.server.api"
RESTART_TEXT = "will restart worker group"

Describe = Callable[[dict[int, Any]], "tuple[RankFailure, ...]"]


def why(failure: RankFailure) -> str:
    """``killed by SIGKILL`` or ``exit code 1: ValueError: ...`` (the last line of its output)."""
    how = f"killed by {failure.signal}" if failure.signal else f"exit code {failure.exitcode}"
    lines = [line.strip() for line in failure.log_tail.splitlines() if line.strip()]
    if lines and not failure.signal:
        how += f": {lines[-1][:200]}"
    return how


class RestartNotice(logging.Filter):
    """Prints the restart line when the agent announces a restart; lets through only the records
    the logger's own level would have let through (the agent's INFO chatter stays hidden)."""

    def __init__(self, describe: Describe, level: int) -> None:
        super().__init__()
        self.describe = describe
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if RESTART_TEXT in str(record.msg) and isinstance(args, tuple) and len(args) >= 4:
            left, total = int(str(args[2])), int(str(args[3]))
            line = f"distrain: restart {total - left + 1} of {total}"
            with contextlib.suppress(Exception):  # the line without its cause beats no line
                failures = self.describe(_agent_failures())
                if failures:
                    line += f": rank {failures[0].rank} {why(failures[0])}"
            print(line, file=sys.stderr, flush=True)
        return record.levelno >= self.level


def _agent_failures() -> dict[int, Any]:
    """The failures of the run result the agent is acting on (a local of its run loop)."""
    frame = sys._getframe()
    while frame is not None and frame.f_code.co_name != "_invoke_run":
        frame = frame.f_back  # type: ignore[assignment]
    result = frame.f_locals.get("run_result") if frame is not None else None
    return dict(getattr(result, "failures", None) or {})


@contextlib.contextmanager
def restart_notices(describe: Describe) -> Iterator[None]:
    """Print a line for every restart while the block runs."""
    logger = logging.getLogger(AGENT_LOGGER)
    level = logger.level
    notice = RestartNotice(describe, logger.getEffectiveLevel())
    logger.addFilter(notice)
    logger.setLevel(min(logging.INFO, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.removeFilter(notice)
        logger.setLevel(level)
