"""The worker environment contract: what every launcher puts in a worker's environment.

Every distrain launcher (local, Ray) starts each worker with exactly the variables that
``torchrun`` sets, with the same meaning, so a script written for one runs under the others:

=============================  ==========================================================
variable                       meaning
=============================  ==========================================================
``RANK``                       global rank, ``0 .. WORLD_SIZE-1``
``LOCAL_RANK``                 rank on this node, ``0 .. LOCAL_WORLD_SIZE-1``
``WORLD_SIZE``                 number of workers in the job
``LOCAL_WORLD_SIZE``           number of workers on this node
``GROUP_RANK``                 index of this node (agent) ``0 .. GROUP_WORLD_SIZE-1``
``GROUP_WORLD_SIZE``           number of nodes
``ROLE_NAME``                  ``--role`` (default ``default``)
``ROLE_RANK`` / ``ROLE_WORLD_SIZE``  rank and size within the role (equal to RANK / WORLD_SIZE)
``MASTER_ADDR`` / ``MASTER_PORT``    where rank 0's TCPStore listens (``env://`` init)
``TORCHELASTIC_RESTART_COUNT`` how many times the group was restarted (0 on the first try)
``TORCHELASTIC_MAX_RESTARTS``  ``--max-restarts``
``TORCHELASTIC_RUN_ID``        ``--rdzv-id`` (or a generated id)
``TORCHELASTIC_USE_AGENT_STORE``  ``True`` when the launcher already hosts the store
``TORCHELASTIC_ERROR_FILE``    where an uncaught error may be recorded (``@record``)
``TORCH_NCCL_ASYNC_ERROR_HANDLING``  ``1``
``OMP_NUM_THREADS``            ``1`` when unset and more than one worker per node
``CUDA_VISIBLE_DEVICES``       passed through locally; set from Ray's GPU assignment on Ray
=============================  ==========================================================

No launcher at all (``python train.py``) is a world of one: :meth:`WorkerEnv.from_environ`
returns rank 0 of 1 and ``launched=False``.

The local launcher gets these from ``torch.distributed.elastic`` itself (it *is* torchrun's
agent); the Ray launcher builds them with :func:`build_worker_env`. A test compares both with
real ``torchrun`` key by key (ports and run ids aside).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from distrain.errors import ConfigError

CONTRACT_KEYS: tuple[str, ...] = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_NAME",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerEnv:
    """The contract as seen by one worker (parsed, validated)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str | None
    master_port: int | None
    restart_count: int
    launched: bool

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> WorkerEnv:
        """Parse the contract from ``environ`` (default ``os.environ``)."""
        env = os.environ if environ is None else environ
        launched = "RANK" in env or "WORLD_SIZE" in env
        world_size = _int(env, "WORLD_SIZE", 1, minimum=1)
        rank = _int(env, "RANK", 0, minimum=0)
        if rank >= world_size:
            raise ConfigError(
                "RANK", rank, f"a rank below WORLD_SIZE={world_size}", "check the launcher's flags"
            )
        local_world_size = _int(env, "LOCAL_WORLD_SIZE", world_size if launched else 1, minimum=1)
        local_rank = _int(env, "LOCAL_RANK", rank % local_world_size, minimum=0)
        port_text = env.get("MASTER_PORT")
        master_port = _int(env, "MASTER_PORT", 0, minimum=1) if port_text else None
        return cls(
            rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            local_world_size=local_world_size,
            node_rank=_int(env, "GROUP_RANK", rank // local_world_size, minimum=0),
            num_nodes=_int(env, "GROUP_WORLD_SIZE", max(1, world_size // local_world_size), minimum=1),
            master_addr=env.get("MASTER_ADDR") or None,
            master_port=master_port,
            restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0, minimum=0),
            launched=launched,
        )


def _int(env: Mapping[str, str], key: str, default: int, *, minimum: int) -> int:
    text = env.get(key)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(key, text, "an integer", f"unset {key} or set it to a number") from None
    if value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}", f"fix {key} in the environment")
    return value


def build_worker_env(
    *,
    rank: int,
    local_rank: int,
    world_size: int,
    local_world_size: int,
    node_rank: int,
    num_nodes: int,
    master_addr: str,
    master_port: int,
    run_id: str,
    restart_count: int = 0,
    max_restarts: int = 0,
    role: str = "default",
    use_agent_store: bool = False,
    omp_num_threads: str | None = None,
) -> dict[str, str]:
    """The contract's variables for one worker, as ``torch.distributed.elastic`` would set them.

    ``omp_num_threads`` is what the launcher resolved (``"1"`` when unset and more than one
    worker per node, as torchrun does); ``None`` leaves ``OMP_NUM_THREADS`` alone.
    """
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "GROUP_RANK": str(node_rank),
        "GROUP_WORLD_SIZE": str(num_nodes),
        "ROLE_NAME": role,
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_USE_AGENT_STORE": str(use_agent_store),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    return env


def default_omp_num_threads(nproc_per_node: int, environ: Mapping[str, str] | None = None) -> str | None:
    """torchrun's rule: ``OMP_NUM_THREADS=1`` when unset and more than one worker per node."""
    env = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in env:
        return env["OMP_NUM_THREADS"]
    return "1" if nproc_per_node > 1 else None


@contextlib.contextmanager
def scoped_environ(changes: Mapping[str, str]) -> Iterator[None]:
    """Set ``changes`` in ``os.environ`` for the block; afterwards restore it exactly.

    Whatever else the block writes to ``os.environ`` (torch elastic's agent, ``ray.init``, a
    module imported in the fast-start server) is undone too: a Python caller of ``launch``/``run``
    and every worker start from the environment they had.
    """
    saved = dict(os.environ)
    os.environ.update(changes)
    try:
        yield
    finally:
        if dict(os.environ) != saved:
            os.environ.clear()
            os.environ.update(saved)
