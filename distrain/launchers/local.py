"""The local launcher: torchrun's own agent (``torch.distributed.elastic``), with better defaults.

What it adds to ``torchrun``, all on top of ``elastic_launch``:

* a free port on every single-node launch (the agent's store on port 0, as
  ``torchrun --standalone`` has), so two jobs on one machine never collide, without the c10d
  rendezvous's random wait at every start and restart (:mod:`distrain.launchers.one_node`);
* console lines prefixed ``[rankN]:`` and per-rank log files kept for the failure summary;
* a failure summary naming each failed rank, its exit code or signal and its last log lines,
  recognising the gloo teardown abort;
* a grace period (``--term-timeout``) between forwarding SIGTERM/SIGINT and killing workers,
  kept whenever the signal comes, even while elastic is starting the workers (``reaper``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal as signal_module
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distrain.affinity import AFFINITY_ENV, launcher_cpus
from distrain.env import default_omp_num_threads, scoped_environ
from distrain.launchers.base import Launcher
from distrain.launchers.node_watch import watching_nodes
from distrain.launchers.recovery import c10d_recovery_conf, restart_preload
from distrain.launchers.restart_notice import restart_notices
from distrain.orphans import launcher_environ
from distrain.results import RankFailure, RunResult, causes_first, classify, tail_text
from distrain.signals import SIGNAL_NAMES, restored_signal_handlers

if TYPE_CHECKING:
    from distrain.launch_config import LaunchConfig
    from distrain.launchers.watchdog import HangWatch

RANK_PREFIX = "[rank${rank}]:"


def rendezvous(config: LaunchConfig) -> tuple[str, str, str, dict[str, Any]]:
    """(backend, endpoint, run id, configs) for the agent: torchrun's rules, free port default."""
    conf: dict[str, Any] = dict(config.rdzv_conf)
    single_node_auto = (
        config.rdzv_backend == "static"
        and not config.rdzv_endpoint
        and config.master_port is None
        and config.max_nodes == 1
    )
    if config.standalone or single_node_auto:
        from distrain.launchers import one_node  # torch.distributed: imported when launching only

        return one_node.register(), "", uuid.uuid4().hex, conf
    if config.rdzv_backend == "static":
        conf["rank"] = config.node_rank
        endpoint = config.rdzv_endpoint or f"{config.master_addr}:{config.master_port}"
        return "static", endpoint, config.rdzv_id, conf
    if config.rdzv_backend == "c10d":
        conf = c10d_recovery_conf(conf)
    return config.rdzv_backend, config.rdzv_endpoint, config.rdzv_id, conf


def uses_fast_start(config: LaunchConfig) -> bool:
    """Script workers forked from the preloaded server (``--start-method forkserver``)."""
    return not callable(config.entrypoint) and not config.no_python and config.start_method == "forkserver"


def worker_command(config: LaunchConfig) -> tuple[str | Callable[..., Any], list[Any]]:
    """The entrypoint and argument list handed to ``elastic_launch`` (torchrun's rules)."""
    if callable(config.entrypoint):
        return run_function, [config.entrypoint, *config.args]
    script = str(config.entrypoint)
    if uses_fast_start(config):
        from distrain.launchers.preload import run_script

        return run_script, [script, list(config.args), config.module]
    if config.no_python:
        return script, list(config.args)
    prefix = ["-u", "-m", script] if config.module else ["-u", script]
    return os.getenv("PYTHON_EXEC", sys.executable), [*prefix, *config.args]


def run_function(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a Python-API function in a worker, then leave nothing for finalization to abort on."""
    from distrain import stacks

    stacks.install()
    try:
        return fn(*args)
    except BaseException as error:
        stacks.on_error(error)
        raise
    finally:
        from distrain.group import cleanup

        cleanup()


def std_settings(config: LaunchConfig) -> tuple[str, str]:
    """(redirects, tee): by default every stream goes to a file *and* the console, prefixed."""
    if config.redirects == "0" and config.tee == "0":
        return "0", "3"
    return config.redirects, config.tee


def launch_environ(config: LaunchConfig) -> dict[str, str]:
    """Variables the launch sets in its own environment (the agent and workers read them).

    * ``OMP_NUM_THREADS=1`` when unset and several workers per node (torchrun's rule).
    * ``DISTRAIN_CPU_AFFINITY``: the CPUs the node's workers share out (``--cpu-affinity auto``);
      empty with ``none``, so that a launch inside a worker does not inherit its parent's list.
    * With ``--max-restarts``: ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``. By default the agent's
      c10d store is shared with the workers and survives a restart, stale keys included, so a
      restarted ``init_process_group`` finds the dead group's gloo addresses and fails
      ("Gloo connectFullMesh failed ... Connection refused"; real torchrun 2.14 does this).
      Without sharing, every attempt gets a fresh store.
    * ``DISTRAIN_LAUNCHER_PID``, ``DISTRAIN_TERM_TIMEOUT``: a worker whose launcher is gone stops
      after the grace period (:mod:`distrain.orphans`).
    """
    # What the agent exports before it starts workers; set here too so that workers forked
    # from a server started earlier see it (environment parity with torchrun).
    changes = {"TORCHELASTIC_SIGNALS_TO_HANDLE": SIGNAL_NAMES}
    threads = default_omp_num_threads(config.nproc_per_node)
    if threads is not None:
        changes["OMP_NUM_THREADS"] = threads
    changes[AFFINITY_ENV] = launcher_cpus() if config.cpu_affinity == "auto" else ""
    if config.max_restarts > 0:
        changes.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    changes.update(launcher_environ(config.term_timeout))
    return changes


@contextlib.contextmanager
def quiet_function_failures() -> Iterator[None]:
    """Hide the agent's own traceback for a failed function worker; our summary says it better."""
    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    levels = agent_log.level, spawn_log.level
    agent_log.setLevel(logging.CRITICAL)
    spawn_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        agent_log.setLevel(levels[0])
        spawn_log.setLevel(levels[1])


class LocalLauncher(Launcher):
    """Starts ``nproc_per_node`` workers on this node through ``torch.distributed.elastic``."""

    def launch(self, config: LaunchConfig) -> RunResult:
        from distrain.launchers.preload import start_server, stop_server
        from distrain.launchers.reaper import workers_never_outlive
        from distrain.launchers.watchdog import watching

        forkserver = config.start_method == "forkserver"
        with (watching(hang_timeout=config.hang_timeout, log_dir=config.log_dir,
                       max_restarts=config.max_restarts) as watch,
              scoped_environ({**launch_environ(config), **watch.environ()}),
              restored_signal_handlers(),
              workers_never_outlive(term_timeout=config.term_timeout) as reaper):
            if forkserver:
                # multiprocessing keeps one forkserver per process: one left by an earlier launch
                # (Python API) would fork workers with its stale environment and preload list.
                stop_server()
            if uses_fast_start(config):
                # First, before this process imports torch: the server's imports then run
                # beside ours (two cores busy, not one after the other).
                start_server(restart_preload(config), str(config.entrypoint), module=config.module,
                             nproc=config.nproc_per_node)
            try:
                return self._launch(config, watch, reaper.workers)
            finally:
                if forkserver:
                    stop_server()  # after any fork in flight; its live children come to us
                # Workers elastic did not stop: a signal that came while it started them.
                reaper.stop_leftovers()

    def _launch(self, config: LaunchConfig, watch: HangWatch,
                workers: Callable[[], set[int]]) -> RunResult:
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig as TorchLaunchConfig
        from torch.distributed.launcher.api import elastic_launch

        own_log_dir = config.log_dir is None
        log_root = config.log_dir or tempfile.mkdtemp(prefix="distrain-logs-")
        redirects, tee = std_settings(config)
        backend, endpoint, run_id, conf = rendezvous(config)
        watch.set_run_id(run_id)
        torch_config = TorchLaunchConfig(
            min_nodes=config.min_nodes,
            max_nodes=config.max_nodes,
            nproc_per_node=config.nproc_per_node,
            run_id=run_id,
            role=config.role,
            rdzv_endpoint=endpoint,
            rdzv_backend=backend,
            rdzv_configs=conf,
            max_restarts=config.max_restarts,
            monitor_interval=config.monitor_interval,
            start_method=config.start_method,
            log_line_prefix_template=RANK_PREFIX,
            local_addr=config.local_addr,
            logs_specs=DefaultLogsSpecs(
                log_dir=log_root,
                redirects=Std.from_str(redirects),
                tee=Std.from_str(tee),
                local_ranks_filter=set(config.local_ranks_filter)
                if config.local_ranks_filter else None,
            ),
            **fields_known_to(TorchLaunchConfig, shutdown_timeout=round(config.term_timeout)),
        )
        entrypoint, args = worker_command(config)

        def failed_first(found: dict[int, Any]) -> tuple[RankFailure, ...]:
            """Causes first, then the earliest: the rank that failed first is usually the cause."""
            attempt_dir = _attempt_dir(log_root, run_id)
            by_time = sorted(found.items(), key=lambda item: (_failed_at(item[1]), item[0]))
            return causes_first(primary_failures([_describe_failure(r, f, attempt_dir) for r, f in by_time]))

        node_watch = None
        nodes = watching_nodes(backend=backend, endpoint=endpoint, run_id=run_id, conf=conf,
                               max_nodes=config.max_nodes, local_addr=config.local_addr, workers=workers)
        try:
            with quiet_function_failures(), restart_notices(failed_first), nodes as node_watch:
                outputs = elastic_launch(torch_config, entrypoint)(*args)
            values = {rank: value for rank, value in (outputs or {}).items()}
            if not values:
                first = config.node_rank * config.nproc_per_node
                values = dict.fromkeys(range(first, first + config.nproc_per_node))
            return RunResult(return_values=values, log_dir=None if own_log_dir else log_root)
        except ChildFailedError as error:
            found = {**_recorded_elsewhere(error.failures, _attempt_dir(log_root, run_id)), **error.failures}
            failures = failed_first(found)
            lost = node_watch.lost_line() if node_watch is not None else ""
            return RunResult(return_values={}, failures=failures, diagnosis=watch.diagnosis or lost,
                             log_dir=None if own_log_dir else log_root)
        except SignalException as error:
            return RunResult(return_values={}, signal=signal_module.Signals(error.sigval).name,
                             log_dir=None if own_log_dir else log_root)
        finally:
            if own_log_dir:
                shutil.rmtree(log_root, ignore_errors=True)


def _attempt_dir(log_root: str, run_id: str) -> Path | None:
    """The newest ``attempt_N`` directory of this run under the log root."""
    attempts = list(Path(log_root).glob(f"{run_id}_*/attempt_*"))
    if not attempts:
        return None
    return max(attempts, key=lambda p: (p.stat().st_mtime, int(p.name.split("_")[1])))


def primary_failures(failures: list[RankFailure]) -> tuple[RankFailure, ...]:
    """The ranks that failed on their own, without those the launcher then stopped (SIGTERM).

    A rank that raised is kept even when SIGTERM caught it on its way out: a failing rank's exit
    lets its peers fail at once, and the launcher may see a peer's failure first and stop it.
    """
    own = [f for f in failures if f.signal != "SIGTERM" or f.raised]
    return tuple(own or failures)


def _recorded_elsewhere(reported: dict[int, Any], attempt_dir: Path | None) -> dict[int, Any]:
    """Exceptions other local ranks recorded (their error files) that elastic did not report.

    With a function entrypoint elastic reports only the first process it saw exit; when a rank
    raises, its peers fail at once and one of them may exit first, hiding the real cause.
    """
    if attempt_dir is None or not reported:
        return {}
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    some_rank, some_failure = next(iter(reported.items()))
    offset = some_rank - some_failure.local_rank  # global rank of local rank 0
    known = {failure.local_rank for failure in reported.values()}
    found: dict[int, Any] = {}
    for error_file in attempt_dir.glob("*/error.json"):
        local_rank = int(error_file.parent.name) if error_file.parent.name.isdigit() else -1
        if local_rank < 0 or local_rank in known:
            continue
        with contextlib.suppress(Exception):  # half-written by a rank stopped mid-write: skip it
            failure = ProcessFailure(local_rank=local_rank, pid=-1, exitcode=1, error_file=str(error_file))
            if raised_on_its_own(failure):
                found[offset + local_rank] = failure
    return found


def _failed_at(failure: Any) -> float:
    """When the rank failed: its error file's mtime (elastic's timestamp has whole seconds)."""
    try:
        return os.stat(failure.error_file).st_mtime
    except (OSError, TypeError):
        return float(failure.timestamp)


def _failure_text(failure: Any) -> tuple[str, str]:
    """(message, traceback) of what the rank recorded; a function's error file nests them."""
    message = failure.message
    if isinstance(message, dict):
        extra = message.get("extraInfo")
        callstack = extra.get("py_callstack", "") if isinstance(extra, dict) else ""
        return str(message.get("message", "")), str(callstack)
    return (message if isinstance(message, str) else ""), ""


def raised_on_its_own(failure: Any) -> bool:
    """The rank recorded an exception (elastic's error file) that is not the stop signal itself."""
    if not (isinstance(failure.error_file, str) and os.path.isfile(failure.error_file)):
        return False
    message, _ = _failure_text(failure)
    return "SignalException" not in message and not message.startswith("Signal ")


def _describe_failure(rank: int, failure: Any, attempt_dir: Path | None) -> RankFailure:
    signal_name = failure.signal_name() if failure.exitcode < 0 else None
    if signal_name == "<N/A>":
        signal_name = None
    log_text = ""
    if attempt_dir is not None:
        for stream in ("stderr.log", "stdout.log"):
            with contextlib.suppress(OSError):
                log_text = (attempt_dir / str(failure.local_rank) / stream).read_text(errors="replace")
            if log_text.strip():
                break
    log_tail = tail_text(log_text)
    message, callstack = _failure_text(failure)
    if not log_tail and message and not message.startswith(("Signal", "To enable traceback")):
        log_tail = tail_text(callstack or message)
    # Read the whole log: a fatal-error dump can push an earlier traceback out of the tail.
    output = log_text or log_tail
    return classify(
        rank=rank, local_rank=failure.local_rank, exitcode=failure.exitcode, signal=signal_name,
        node=os.uname().nodename, log_tail=log_tail, output=output, raised=raised_on_its_own(failure),
    )


def fields_known_to(config_type: type, **values: Any) -> dict[str, Any]:
    """The ``values`` that ``config_type`` (a dataclass) has fields for.

    ``shutdown_timeout`` came to torch's ``LaunchConfig`` in a later release than the oldest torch
    distrain supports; there the reaper still enforces the grace period.
    """
    known = {field.name for field in dataclasses.fields(config_type)}
    return {name: value for name, value in values.items() if name in known}
