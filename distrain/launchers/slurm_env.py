"""What a SLURM job tells ``distrain launch``: nodes, node rank, head node, job id, ranks per node.

``srun distrain launch train.py`` (one task per node) and ``distrain launch train.py`` in an
sbatch script need no rendezvous flags: :func:`apply_slurm_defaults` turns SLURM's variables into
the parser's defaults, so a flag on the command line (or torchrun's ``PET_*`` variable) always
wins. Rendezvous defaults are applied only when no rendezvous flag was given at all, because
they belong together (a ``--master-addr`` without SLURM's node rank would be half a setting).
Pure: everything is read from the mapping passed in.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from distrain.errors import ConfigError

__all__ = ["SlurmJob", "apply_slurm_defaults", "describe", "detect", "expand_hostlist"]

# Flags that choose how nodes meet; any one of them given means "the user decides rendezvous".
RENDEZVOUS_DESTS = ("node_rank", "master_addr", "master_port", "rdzv_backend", "rdzv_endpoint",
                    "rdzv_id", "standalone")
# Lightning's rule for a port every node derives alike when MASTER_PORT is not set.
PORT_BASE = 15000
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_COUNT = re.compile(r"^(\d+)")
# Set for every rank a launcher starts (torchrun's contract). SLURM's variables there are those of
# the launcher's task (SLURM_PROCID is the node's, not the rank's): a nested launch ignores them.
RANK_KEYS = ("RANK", "LOCAL_RANK")


@dataclass(frozen=True, slots=True, kw_only=True)
class SlurmJob:
    """The SLURM variables distrain uses, already parsed."""

    job_id: str
    nnodes: int
    node_rank: int
    nodes: tuple[str, ...]
    head: str
    port: int
    nproc_per_node: int | None  # None: SLURM says nothing (no GPUs; a step of one task per node)
    nproc_source: str
    restart_count: int


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list (``node[01-03,7],gpu5``) -> the host names, in order."""
    hosts: list[str] = []
    depth, start = 0, 0
    for index, char in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            if text[start:index]:
                hosts.extend(_expand_one(text[start:index]))
            start = index + 1
    return hosts


def _expand_one(item: str) -> list[str]:
    head, bracket, rest = item.partition("[")
    if not bracket:
        return [item]
    inner, _, tail = rest.partition("]")
    names: list[str] = []
    for part in inner.split(","):
        match = _RANGE.match(part)
        if not match:
            raise ConfigError("SLURM_JOB_NODELIST", item, "a SLURM host list like node[1-3,5]",
                              "run inside a SLURM allocation, or pass the rendezvous flags")
        low, high = match.group(1), match.group(2) or match.group(1)
        width = len(low)
        names.extend(f"{head}{number:0{width}d}" for number in range(int(low), int(high) + 1))
    return [name + suffix for name in names for suffix in _expand_one(tail)] if tail else names


def _count(text: str | None) -> int | None:
    """``"4"``, ``"4(x2)"``, ``"gpu:4"`` -> 4; nothing usable -> None."""
    if not text:
        return None
    match = _COUNT.match(text.rsplit(":", 1)[-1])
    return int(match.group(1)) if match else None


def detect(environ: Mapping[str, str]) -> SlurmJob | None:
    """The job this process runs in, or None outside SLURM (no ``SLURM_JOB_ID``) and in a rank
    that a launcher started (``RANK`` and ``LOCAL_RANK`` set)."""
    if all(key in environ for key in RANK_KEYS):
        return None
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not job_id or not nodelist:
        return None
    nodes = tuple(expand_hostlist(nodelist))
    in_step = "SLURM_STEP_ID" in environ
    tasks_here = _count(environ.get("SLURM_STEP_TASKS_PER_NODE")) if in_step else 1
    if tasks_here is not None and tasks_here > 1:
        raise ConfigError("SLURM_STEP_TASKS_PER_NODE", environ["SLURM_STEP_TASKS_PER_NODE"],
                          "one distrain launch per node (it starts the ranks itself)",
                          "use srun --ntasks-per-node=1 --ntasks=$SLURM_JOB_NUM_NODES distrain launch")
    gpus = _count(environ.get("SLURM_GPUS_ON_NODE"))
    tasks = None if in_step else _count(environ.get("SLURM_NTASKS_PER_NODE"))
    nproc, source = ((gpus, "SLURM_GPUS_ON_NODE") if gpus else
                     (tasks, "SLURM_NTASKS_PER_NODE") if tasks else (None, ""))
    port_text = environ.get("MASTER_PORT")
    digits = re.sub(r"\D", "", job_id) or "0"
    port = int(port_text) if port_text and port_text.isdigit() else PORT_BASE + int(digits[-4:])
    return SlurmJob(
        job_id=job_id,
        nnodes=len(nodes),
        node_rank=int(environ.get("SLURM_NODEID", "0")),
        nodes=nodes,
        head=environ.get("MASTER_ADDR") or nodes[0],
        port=port,
        nproc_per_node=nproc,
        nproc_source=source,
        restart_count=int(environ.get("SLURM_RESTART_COUNT", "0") or 0),
    )


def launch_defaults(job: SlurmJob, explicit: set[str]) -> dict[str, object]:
    """Parser defaults (by ``dest``) for ``job``, leaving out what the user set in ``explicit``."""
    values: dict[str, object] = {"nnodes": str(job.nnodes)}
    if job.nproc_per_node is not None:
        values["nproc_per_node"] = str(job.nproc_per_node)
    # One node keeps the launcher's own private store on a free port: nothing to agree on.
    if job.nnodes > 1 and not explicit & set(RENDEZVOUS_DESTS):
        values.update(node_rank=job.node_rank, rdzv_backend="c10d",
                      rdzv_endpoint=f"{job.head}:{job.port}", rdzv_id=f"slurm-{job.job_id}")
    return {key: value for key, value in values.items() if key not in explicit}


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str],
              environ: Mapping[str, str]) -> argparse.Namespace:
    """The options given on the command line (or as ``PET_*``), with no defaults filled in."""
    given = argparse.Namespace()
    for action in parser._actions:
        if action.option_strings and "PET_" + action.dest.upper() in environ:
            setattr(given, action.dest, environ["PET_" + action.dest.upper()])
    saved = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        found, _ = parser.parse_known_args(list(argv), given)
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
    return found


def apply_slurm_defaults(parser: argparse.ArgumentParser, argv: Sequence[str],
                         environ: Mapping[str, str]) -> SlurmJob | None:
    """Inside a SLURM job, make its variables the defaults of ``parser``; explicit flags win."""
    job = detect(environ)
    if job is None:
        return None
    given = vars(_explicit(parser, argv, environ))
    if given.get("launcher", "local") != "local":
        return job  # the Ray launcher places ranks on its cluster itself
    parser.set_defaults(**launch_defaults(job, set(given)))
    return job


def describe(job: SlurmJob | None) -> list[tuple[str, str]]:
    """Rows for ``distrain env``: what ``distrain launch`` takes from SLURM here."""
    if job is None:
        return [("slurm", "nothing taken: not in a SLURM job, or a rank (its launcher took them)")]
    defaults = launch_defaults(job, set())
    rows = [("slurm job", job.job_id + (f" (restart {job.restart_count})" if job.restart_count else "")),
            ("slurm nodes", f"{job.nnodes}: {','.join(job.nodes)}"),
            ("slurm node rank", str(job.node_rank)),
            ("slurm nproc-per-node", f"{job.nproc_per_node} ({job.nproc_source})"
             if job.nproc_per_node else "not set by SLURM (launcher default)")]
    if "rdzv_endpoint" in defaults:
        rows.append(("slurm rendezvous", f"c10d {defaults['rdzv_endpoint']} id {defaults['rdzv_id']}"))
    else:
        rows.append(("slurm rendezvous", "one node: private store on a free port"))
    return rows
