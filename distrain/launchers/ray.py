"""The Ray launcher: the user's unchanged script, one process per rank, on a Ray cluster.

``distrain launch --launcher ray [--address ...] --num-workers N script.py args`` (or
``--nnodes/--nproc-per-node``) reserves one placement-group bundle per rank
(``--cpus-per-worker``/``--gpus-per-worker``, ``--placement-strategy``), starts one actor per
bundle and, in each, the script as ``__main__`` of its own process with the environment
contract of :mod:`distrain.env` (the same variables the local launcher and ``torchrun`` set).

Failures are handled like the local launcher: any rank failing or its node dying stops every
rank (SIGTERM, ``--term-timeout`` grace, SIGKILL), removes the placement group and reports
which rank failed, where, and its last lines. ``--max-restarts N`` starts a fresh group on the
nodes still alive, elastic between ``--nnodes MIN:MAX`` (in steps of ``--nproc-per-node``) or
``--num-workers MIN:MAX`` workers. Modules: ``ray_session`` (connect, ship code),
``ray_group`` (one attempt), ``ray_worker`` (the actor), ``ray_output`` (console and files),
``ray_watch`` (``--hang-timeout`` and stacks, through the actors).
"""

from __future__ import annotations

import dataclasses
import pickle
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from distrain.errors import ConfigError
from distrain.launchers.base import Launcher
from distrain.signals import restored_signal_handlers

if TYPE_CHECKING:
    from distrain.launch_config import LaunchConfig
    from distrain.launchers.ray_group import Outcome
    from distrain.launchers.ray_session import CommandPlan, StopRequest
    from distrain.launchers.ray_watch import RayRanks
    from distrain.results import RunResult

DEFAULT_JOIN_TIMEOUT = 600.0  # torchrun's rendezvous join timeout


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_ray_config(config: LaunchConfig) -> float:
    """Validate what only the Ray launcher reads; return the join timeout in seconds."""
    options = config.ray
    if options.cpus_per_worker <= 0 and options.gpus_per_worker <= 0:
        raise ConfigError(
            "--cpus-per-worker/--gpus-per-worker", (options.cpus_per_worker,
                                                    options.gpus_per_worker),
            "at least one above 0 (each rank reserves a bundle)", "e.g. --cpus-per-worker 1",
        )
    text = config.rdzv_conf.get("join_timeout", str(DEFAULT_JOIN_TIMEOUT))
    try:
        timeout = float(text)
    except ValueError:
        timeout = -1.0
    if timeout <= 0:
        raise ConfigError("--rdzv-conf join_timeout", text, "a positive number of seconds",
                          "e.g. --rdzv-conf join_timeout=600")
    return timeout


def function_payload(config: LaunchConfig) -> bytes | None:
    """The pickled call for a Python-API entrypoint (with the launcher's ``sys.path``)."""
    if not callable(config.entrypoint):
        return None
    try:
        call = pickle.dumps((config.entrypoint, tuple(config.args)))
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise ConfigError("fn", getattr(config.entrypoint, "__qualname__", config.entrypoint),
                          "a picklable function (defined at module level) and arguments",
                          f"move it to module level ({error})") from None
    return pickle.dumps((list(sys.path), call))


class RayLauncher(Launcher):
    """Runs the job on Ray: the cluster at ``--address``, or a local Ray it starts."""

    def launch(self, config: LaunchConfig) -> RunResult:
        from distrain.launchers.ray_group import Interrupted, RayRankFailure, StartError
        from distrain.launchers.ray_session import (
            catch_signals,
            find_target,
            plan_command,
            ray_session,
        )
        from distrain.launchers.ray_watch import RayRanks
        from distrain.launchers.watchdog import watching
        from distrain.results import RunResult

        join_timeout = check_ray_config(config)
        payload = function_payload(config)
        run_id = config.rdzv_id if config.rdzv_id not in ("", "none") else uuid.uuid4().hex[:12]
        run_dir = Path(config.log_dir) / run_id if config.log_dir else None
        log_dir = str(run_dir) if run_dir else None
        cpus = config.world_size * config.ray.cpus_per_worker
        target = find_target(config.ray)
        plan = plan_command(config, target)
        ranks = RayRanks()
        # Signals are caught after ray.init: Ray's driver installs its own SIGTERM handler
        # (which prints a stack and exits), and ours must be the one in place.
        with restored_signal_handlers(), \
                ray_session(target, runtime_env=plan.runtime_env, num_cpus=cpus, say=say), \
                catch_signals() as stop, \
                watching(hang_timeout=config.hang_timeout, log_dir=log_dir,
                         max_restarts=config.max_restarts, source=ranks) as watch:
            watch.set_run_id(run_id)
            # Each actor points the watch directory at one of its own (see RankWorker.start).
            plan = dataclasses.replace(plan, base_env={**plan.base_env, **watch.environ()})
            attempt = 0
            while True:
                watch.diagnosis = ""  # only this attempt's hang explains this attempt's failure
                try:
                    outcome = self._attempt(config, plan, attempt, run_id, run_dir, stop,
                                            join_timeout, payload, ranks)
                except Interrupted as signal_name:
                    return RunResult(return_values={}, signal=str(signal_name),
                                     restarts=attempt, log_dir=log_dir)
                except StartError as error:
                    failure = RayRankFailure(rank=-1, local_rank=-1, exitcode=1, signal=None,
                                             node="-", log_tail="", reason=str(error))
                    if not error.retryable or attempt >= config.max_restarts:
                        return RunResult(return_values={}, failures=(failure,),
                                         restarts=attempt, log_dir=log_dir)
                    say(f"distrain: {failure.describe()}")
                else:
                    if outcome.signal:
                        return RunResult(return_values={}, signal=outcome.signal,
                                         restarts=attempt, log_dir=log_dir)
                    if not outcome.failures:
                        return RunResult(return_values=dict(outcome.values), restarts=attempt,
                                         log_dir=log_dir)
                    if attempt >= config.max_restarts:
                        return RunResult(return_values={}, failures=outcome.failures,
                                         restarts=attempt, log_dir=log_dir,
                                         diagnosis=watch.diagnosis)
                    say("distrain: " + outcome.failures[0].describe().splitlines()[0])
                attempt += 1
                say(f"distrain: restarting the group (restart {attempt} of "
                    f"{config.max_restarts}) on the nodes still alive")

    def _attempt(self, config: LaunchConfig, plan: CommandPlan, attempt: int, run_id: str,
                 run_dir: Path | None, stop: StopRequest, join_timeout: float,
                 payload: bytes | None, ranks: RayRanks) -> Outcome:
        """One group: size it (elastic), start it, watch it; always tear it down."""
        import ray

        from distrain.launchers.ray_group import WorkerGroup
        from distrain.launchers.ray_output import RankOutput
        from distrain.launchers.ray_session import capacity, choose_size

        size = config.world_size
        if config.min_nodes != config.max_nodes:
            size = choose_size(config, capacity(ray.nodes(), config.ray))
            say(f"distrain: attempt {attempt}: {size} workers (elastic "
                f"{config.min_nodes * config.nproc_per_node}..{config.world_size})")
        output = RankOutput(config, run_dir / f"attempt_{attempt}" if run_dir else None)
        group = WorkerGroup(config=config, plan=plan, size=size, attempt=attempt, run_id=run_id,
                            stop=stop, output=output, join_timeout=join_timeout,
                            payload=payload, say=say)
        try:
            group.start()
            ranks.attach(group.actors)
            return group.watch()
        finally:
            ranks.detach()
            group.close()
            output.close()
