"""How fast an elastic c10d job notices a lost node and starts again without it.

torch's dynamic rendezvous defaults make a survivor wait about 45 s before it trains again:
a node is declared gone only after ``keep_alive_interval x keep_alive_max_attempt`` (5 s x 3)
without a heartbeat, and once enough nodes are back the round stays open ``last_call_timeout``
(30 s) for stragglers. distrain shortens both for ``--rdzv-backend c10d`` (anything given in
``--rdzv-conf`` wins):

* a node is declared gone after 1 s x 4 = 4 s without a heartbeat (torch then only drops it
  from the round's books: a live node that was merely slow goes on undisturbed);
* the round closes 2 s after the minimum number of nodes is back. A node that arrives later
  waits, and the running nodes restart once more to admit it (torch counts that as a
  membership change, not as one of ``--max-restarts``).

A job that may restart (``--max-restarts`` > 0) also has the fast-start server import what
building DDP imports (``torch._dynamo``) once, before the first fork: otherwise every restarted
rank imports it again before its first step (most of a restart's time on a loaded machine).
Likewise ``s3fs`` (fsspec's ``s3://`` backend) when a script argument names an ``s3://`` URL,
which is how a checkpoint store on S3 reaches a script.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from distrain.launchers.preload_scan import TRAINING_LAZY_IMPORTS

if TYPE_CHECKING:
    from distrain.launch_config import LaunchConfig

S3_URL_PREFIX = "s3://"
S3_CLIENT_MODULE = "s3fs"
KEEP_ALIVE_INTERVAL_S = 1
KEEP_ALIVE_MAX_ATTEMPT = 4
LAST_CALL_TIMEOUT_S = 2

#: Seconds without a heartbeat after which a node is declared gone.
NODE_LOST_AFTER_S = KEEP_ALIVE_INTERVAL_S * KEEP_ALIVE_MAX_ATTEMPT


def c10d_recovery_conf(conf: Mapping[str, Any]) -> dict[str, Any]:
    """``conf`` with distrain's recovery defaults for the c10d rendezvous filled in."""
    return {
        "keep_alive_interval": KEEP_ALIVE_INTERVAL_S,
        "keep_alive_max_attempt": KEEP_ALIVE_MAX_ATTEMPT,
        "last_call_timeout": LAST_CALL_TIMEOUT_S,
        **conf,
    }


def restart_preload(config: LaunchConfig) -> Sequence[str]:
    """``--preload`` for the fast-start server, plus what a restarted rank imports before its
    first step (DDP's lazy imports; the S3 client when an argument is an ``s3://`` URL)."""
    if config.max_restarts == 0:
        return config.preload
    wanted = [*TRAINING_LAZY_IMPORTS]
    if any(str(arg).startswith(S3_URL_PREFIX) or f"={S3_URL_PREFIX}" in str(arg) for arg in config.args):
        wanted.append(S3_CLIENT_MODULE)
    return [*config.preload, *(name for name in wanted if name not in config.preload)]
