"""One attempt of a Ray job: a placement group, one actor per rank, watched until it ends.

Ranks are numbered node by node (all ranks on the rank-0 node first), so ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` and ``GROUP_RANK`` mean what they mean under ``torchrun``. Rank 0's actor
hosts the job's TCPStore, like torchrun's agent: ``MASTER_ADDR`` is its node's IP and
``MASTER_PORT`` the port the store bound there.

The launcher reads every actor with a long poll (one outstanding ``poll`` per rank, answered
as soon as there is output or an exit), so output streams with little overhead and a dead actor
(its node gone) shows up as an error on that rank's poll at once.
"""

from __future__ import annotations

import contextlib
import pickle
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distrain.env import build_worker_env, default_omp_num_threads
from distrain.launchers.ray_output import RankOutput
from distrain.launchers.ray_session import CommandPlan, StopRequest, bundle
from distrain.launchers.ray_worker import RankWorker
from distrain.results import RankFailure, causes_first, classify
from distrain.signals import SIGNAL_NAMES

if TYPE_CHECKING:
    from distrain.launch_config import LaunchConfig

POLL_S = 1.0  # how long an actor holds a poll open when it has nothing to say
WAIT_S = 0.25  # how often the launcher looks at signals while waiting
SIGNALS_TO_HANDLE = SIGNAL_NAMES  # torchrun's agent exports this to workers


@dataclass(frozen=True, slots=True, kw_only=True)
class RayRankFailure(RankFailure):
    """A rank that failed without an exit status of its own: its actor or node died, or the
    group could not start (``rank == -1``). ``reason`` says which, in words."""

    reason: str = ""

    def describe(self) -> str:
        if self.rank < 0:
            return f"the workers could not start: {self.reason}"
        if not self.reason:
            return RankFailure.describe(self)
        return self.with_output(f"rank {self.rank} (local rank {self.local_rank} on {self.node}) failed: "
                                f"{self.reason}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Place:
    """Where one rank runs."""

    rank: int
    local_rank: int
    local_world_size: int
    node_index: int
    node_id: str
    ip: str
    gpu_ids: tuple[str, ...]

    @property
    def node(self) -> str:
        return f"{self.ip} (Ray node {self.node_id[:8]})"


def assign_ranks(infos: Sequence[Mapping[str, Any]]) -> list[tuple[int, Place]]:
    """(actor index, place) by rank: nodes in order of their first actor, ranks node by node."""
    nodes: dict[str, list[int]] = {}
    for index, info in enumerate(infos):
        nodes.setdefault(str(info["node_id"]), []).append(index)
    placed: list[tuple[int, Place]] = []
    for node_index, members in enumerate(nodes.values()):
        for local_rank, index in enumerate(members):
            info = infos[index]
            placed.append((index, Place(
                rank=len(placed), local_rank=local_rank, local_world_size=len(members),
                node_index=node_index, node_id=str(info["node_id"]), ip=str(info["ip"]),
                gpu_ids=tuple(str(g) for g in info.get("gpu_ids", ())),
            )))
    return placed


class StartError(Exception):
    """The group could not start; ``retryable`` when a restart may help (an actor died)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Interrupted(Exception):
    """A signal arrived while the group was starting."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    values: Mapping[int, Any]
    failures: tuple[RankFailure, ...] = ()
    signal: str | None = None


class WorkerGroup:
    """Start, watch and stop the ranks of one attempt. Always call :meth:`close`."""

    def __init__(self, *, config: LaunchConfig, plan: CommandPlan, size: int, attempt: int,
                 run_id: str, stop: StopRequest, output: RankOutput, join_timeout: float,
                 payload: bytes | None, say: Callable[[str], None]) -> None:
        self._config = config
        self._plan = plan
        self._size = size
        self._attempt = attempt
        self._run_id = run_id
        self._stop = stop
        self._output = output
        self._join_timeout = join_timeout
        self._payload = payload
        self._say = say
        self._pg: Any = None
        self._actors: list[Any] = []  # by rank once placed
        self._places: list[Place] = []

    @property
    def actors(self) -> tuple[Any, ...]:
        """The actors by rank, once started."""
        return tuple(self._actors)

    # ------------------------------------------------------------------------------------------
    # Start
    # ------------------------------------------------------------------------------------------

    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options = self._config.ray
        need = bundle(options)
        self._pg = placement_group([dict(need)] * self._size, strategy=options.placement_strategy,
                                   name=f"distrain-{self._run_id}-{self._attempt}")
        what = (f"{self._size} workers of {need} ({options.placement_strategy}); add nodes or"
                " lower --nnodes/--num-workers, or raise --rdzv-conf join_timeout=SECONDS")
        self._wait([self._pg.ready()], what, retryable=False)
        remote: Any = ray.remote(RankWorker)
        actors = [
            remote.options(
                num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker,
                max_concurrency=4, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=index),
            ).remote()
            for index in range(self._size)
        ]
        self._actors = actors
        # Rank 0 is always the first bundle's actor (assign_ranks numbers its node first), so
        # its store can open while the others report where they are.
        store = actors[0].serve_store.remote()
        infos = self._wait([a.describe.remote() for a in actors], "the worker actors to start",
                           retryable=True)
        placed = assign_ranks(infos)
        self._actors = [actors[index] for index, _ in placed]
        self._places = [place for _, place in placed]
        for place in self._places:
            self._output.add_rank(place.rank, place.local_rank)
        host, port = self._wait([store], "rank 0 to open the TCPStore", retryable=True)[0]
        started = [
            actor.start.remote(
                list(self._plan.argv), self._env(place, str(host), int(port)),
                python=self._plan.python, inherit=self._plan.inherit_env,
                unset=self._unset(place), cwd=self._plan.cwd, payload=self._payload,
            )
            for actor, place in zip(self._actors, self._places)
        ]
        self._wait(started, "the ranks' processes to start", retryable=True)

    def _env(self, place: Place, master_addr: str, master_port: int) -> dict[str, str]:
        config = self._config
        base = dict(self._plan.base_env)
        env = build_worker_env(
            rank=place.rank, local_rank=place.local_rank, world_size=self._size,
            local_world_size=place.local_world_size, node_rank=place.node_index,
            num_nodes=len({p.node_id for p in self._places}), master_addr=master_addr,
            master_port=master_port, run_id=self._run_id, restart_count=self._attempt,
            max_restarts=config.max_restarts, role=config.role, use_agent_store=True,
            omp_num_threads=default_omp_num_threads(place.local_world_size),
        )
        env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = SIGNALS_TO_HANDLE
        if config.ray.gpus_per_worker > 0:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(place.gpu_ids)
        return {**base, **env}

    def _unset(self, place: Place) -> list[str]:
        # torchrun leaves OMP_NUM_THREADS unset with one worker per node; Ray's own default
        # (the actor's CPU count) must not leak into the rank instead.
        return [] if default_omp_num_threads(place.local_world_size) else ["OMP_NUM_THREADS"]

    def _wait(self, refs: list[Any], what: str, *, retryable: bool) -> list[Any]:
        """``ray.get(refs)``, giving up after the join timeout or on a signal."""
        import ray

        deadline = time.monotonic() + self._join_timeout
        next_note = time.monotonic() + 15.0
        pending = list(refs)
        while pending:
            if self._stop.name:
                raise Interrupted(self._stop.name)
            if time.monotonic() > deadline:
                raise StartError(f"timed out after {self._join_timeout:.0f}s waiting for {what}",
                                 retryable=retryable)
            if time.monotonic() > next_note:
                self._say(f"distrain: still waiting for {what}")
                next_note = time.monotonic() + 30.0
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=WAIT_S)
        try:
            return list(ray.get(refs))
        except ray.exceptions.RuntimeEnvSetupError as error:
            raise StartError(f"Ray could not set up the runtime_env: {error}", retryable=False) from None
        except ray.exceptions.RayError as error:
            raise StartError(f"{what} failed: {_first_line(error)}", retryable=retryable) from None

    # ------------------------------------------------------------------------------------------
    # Watch and stop
    # ------------------------------------------------------------------------------------------

    def watch(self) -> Outcome:
        """Stream output until every rank exits, one fails, its node dies, or a signal comes."""
        import ray

        pending = {actor.poll.remote(POLL_S): rank for rank, actor in enumerate(self._actors)}
        reports: dict[int, dict[str, Any]] = {}
        dead: dict[int, tuple[str, float]] = {}
        while pending and not self._stop.name:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    report = ray.get(ref)
                except ray.exceptions.RayError as error:
                    dead[rank] = (self._death_reason(rank, error), time.time())
                    continue
                self._output.emit(rank, report["lines"])
                if report["exitcode"] is None:
                    pending[self._actors[rank].poll.remote(POLL_S)] = rank
                else:
                    reports[rank] = report
            if dead or any(r["exitcode"] != 0 for r in reports.values()):
                break
        if pending:
            signum = signal.Signals[self._stop.name] if self._stop.name else signal.SIGTERM
            self._stop_ranks(pending, reports, dead, signum)
        if self._stop.name:
            return Outcome(values={}, signal=self._stop.name)
        failures = self._failures(reports, dead)
        if failures:
            return Outcome(values={}, failures=failures)
        return Outcome(values={rank: self._value(reports[rank]) for rank in sorted(reports)})

    def _stop_ranks(self, pending: dict[Any, int], reports: dict[int, dict[str, Any]],
                    dead: dict[int, tuple[str, float]], signum: signal.Signals) -> None:
        """Signal every rank still running, SIGKILL after the grace period, collect reports."""
        import ray

        grace = self._config.term_timeout
        stops = {self._actors[rank].stop.remote(int(signum), grace): rank
                 for rank in set(pending.values())}
        waiting = [*pending, *stops]
        deadline = time.monotonic() + grace + 15.0
        signals_seen = self._stop.count
        while waiting and time.monotonic() < deadline:
            _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=WAIT_S)
            if self._stop.count > signals_seen:  # asked twice: do not wait out the grace
                signals_seen = self._stop.count
                for rank in set(stops.values()):
                    self._actors[rank].stop.remote(int(signal.SIGKILL), 0.0)
        for refs in (pending, stops):  # polls took their lines before the stop did
            for ref, rank in refs.items():
                try:
                    report = ray.get(ref, timeout=0)
                except (ray.exceptions.RayError, TimeoutError) as error:
                    if rank not in dead and rank not in reports:
                        dead[rank] = (self._death_reason(rank, error), time.time())
                    continue
                self._output.emit(rank, report["lines"])
                if report["exitcode"] is not None:
                    reports[rank] = report

    def _failures(self, reports: Mapping[int, Mapping[str, Any]],
                  dead: Mapping[int, tuple[str, float]]) -> tuple[RankFailure, ...]:
        """Ranks that failed on their own (not those stopped because another failed), first
        failure first."""
        found: list[tuple[float, RankFailure]] = []
        for rank, (reason, when) in dead.items():
            place = self._places[rank]
            found.append((when, RayRankFailure(
                rank=rank, local_rank=place.local_rank, exitcode=-int(signal.SIGKILL),
                signal=None, node=place.node, log_tail=self._output.tail(rank), reason=reason)))
        for rank, report in reports.items():
            code = int(report["exitcode"])
            if code == 0 or report.get("stopped"):
                continue
            place = self._places[rank]
            signal_name = _signal_name(code)
            tail = self._output.tail(rank)
            found.append((float(report.get("exit_time") or 0.0), classify(
                rank=rank, local_rank=place.local_rank, exitcode=code, signal=signal_name,
                node=place.node, log_tail=tail, output=tail, name_lost_peer=False)))
        return causes_first([failure for _, failure in sorted(found, key=lambda item: item[0])])

    def _value(self, report: Mapping[str, Any]) -> Any:
        data = report.get("result")
        return pickle.loads(data) if self._payload is not None and data is not None else None

    def _death_reason(self, rank: int, error: BaseException) -> str:
        place = self._places[rank]
        text = str(error)
        if "node has died" in text or not _node_alive(place.node_id):
            return f"its Ray node {place.node} died"
        return f"its Ray actor died ({type(error).__name__}: {_first_line(error)})"

    def close(self) -> None:
        """Stop every actor and remove the placement group; nothing of this attempt remains."""
        import ray
        from ray.util.placement_group import remove_placement_group

        closing = []
        for actor in self._actors:
            try:
                closing.append(actor.close.remote())
            except Exception:  # an actor that is already gone has nothing to close
                continue
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=5.0)
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                continue
        if self._pg is not None:
            with contextlib.suppress(Exception):  # already removed with its owner
                remove_placement_group(self._pg)
        self._actors, self._pg = [], None


def _node_alive(node_id: str) -> bool:
    import ray

    return any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())


def _signal_name(code: int) -> str | None:
    if code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
