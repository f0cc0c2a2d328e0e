"""The Ray side of the Ray launcher: one actor per rank, each running the user's script in a child.

Why a child process and not ``runpy`` inside the actor: the script must be ``__main__`` of a
fresh interpreter exactly as under ``torchrun`` (its own ``sys.argv``, signal dispositions,
``atexit``, interpreter finalization, exit code). A child also gives a clean exit status to
report (an exit code, a signal, the gloo teardown SIGABRT), one process group to signal and kill
with everything the script started, and an actor that survives to report what happened.

The child is started from a dedicated thread with ``PR_SET_PDEATHSIG=SIGKILL`` (Linux): if the
actor process dies for any reason (``ray.kill``, its node removed, OOM) the kernel kills the
script too, so nothing keeps running on a node after its actor is gone.

The class is plain Python; :mod:`distrain.launchers.ray_group` wraps it with ``ray.remote`` so
this module imports neither Ray nor torch at import time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

# Runs in a tiny interpreter between fork and the real program. Ray's workers block and ignore
# SIGINT (and ignore SIGQUIT); both survive execve, so without this a rank would never see the
# Ctrl-C the launcher forwards. Then ask the kernel to SIGKILL us when the thread that started
# us dies, check that it has not died already, and become the real program (the death signal
# survives execve too).
_BOOTSTRAP = (
    "import ctypes,os,signal,sys\n"
    "for s in ('SIGINT','SIGTERM','SIGHUP','SIGQUIT','SIGPIPE','SIGXFSZ'):\n"
    "    signal.signal(getattr(signal, s), signal.SIG_DFL)\n"
    "signal.pthread_sigmask(signal.SIG_SETMASK, [])\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(137)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)
MAX_LINES_PER_POLL = 5000
READER_DRAIN_TIMEOUT = 2.0


class RankWorker:
    """Runs one rank's process on the node Ray placed it, and reports its output and exit."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._lines: list[tuple[str, str]] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._exitcode: int | None = None
        self._exit_time: float | None = None
        self._stop_requested = False
        self._start_error: str | None = None
        self._store: Any = None
        self._tmp = tempfile.mkdtemp(prefix="distrain-ray-")
        self._result_path = os.path.join(self._tmp, "result.pkl")
        self._watch_dir = os.path.join(self._tmp, "watch")  # the rank's heartbeat, on its node

    # --------------------------------------------------------------------------------------
    # Where am I
    # --------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Node id, node IP, host name and the accelerators Ray assigned to this actor."""
        import ray

        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "gpu_ids": list(context.get_accelerator_ids().get("GPU", [])),
            "pid": os.getpid(),
            "tmp": self._tmp,
        }

    def serve_store(self) -> tuple[str, int]:
        """Host the job's TCPStore (as torchrun's agent does); return this node's IP and its port.

        Workers get ``TORCHELASTIC_USE_AGENT_STORE=True`` and connect as clients, so the port
        is bound here before any worker starts: no race between picking and using it.
        """
        import ray
        from torch.distributed import TCPStore

        host = ray.util.get_node_ip_address()
        self._store = TCPStore(host_name=host, port=0, is_master=True, wait_for_workers=False)
        return host, int(self._store.port)

    # --------------------------------------------------------------------------------------
    # Running
    # --------------------------------------------------------------------------------------

    def start(self, argv: Sequence[str], env: Mapping[str, str], *, python: bool, inherit: bool,
              unset: Sequence[str], cwd: str | None, payload: bytes | None) -> None:
        """Start the rank's process: ``argv``, after this node's Python (``python``, unbuffered).

        ``env`` is laid over this actor's own environment when ``inherit`` (a remote node: its
        PATH, its Ray runtime_env) or used as it is; ``unset`` names variables to drop.
        ``payload`` is a pickled function call (Python API).
        """
        child_env = {**os.environ, **env} if inherit else dict(env)
        for key in unset:
            child_env.pop(key, None)
        argv = list(argv)
        if python:  # torchrun's rule: PYTHON_EXEC, else the interpreter running this node
            argv = [child_env.get("PYTHON_EXEC", sys.executable), "-u", *argv]
        child_env["TORCHELASTIC_ERROR_FILE"] = os.path.join(self._tmp, "error.json")
        from distrain.heartbeat import WATCH_DIR_ENV

        if WATCH_DIR_ENV in child_env:  # watched: the rank beats here, read by ray_watch
            os.makedirs(self._watch_dir, exist_ok=True)
            child_env[WATCH_DIR_ENV] = self._watch_dir
        if payload is not None:
            payload_path = os.path.join(self._tmp, "payload.pkl")
            with open(payload_path, "wb") as f:
                f.write(payload)
            argv = [*argv, payload_path, self._result_path]
        if cwd is not None and not os.path.isdir(cwd):
            cwd = None  # the launcher's directory does not exist on this node: stay put
        ready = threading.Event()
        thread = threading.Thread(
            target=self._supervise, args=(argv, child_env, cwd, ready), daemon=True,
            name="distrain-rank-supervisor",
        )
        thread.start()
        ready.wait()
        if self._start_error is not None:
            raise RuntimeError(self._start_error)

    def _supervise(self, argv: list[str], env: dict[str, str], cwd: str | None,
                   ready: threading.Event) -> None:
        # This thread lives exactly as long as the child: PDEATHSIG fires when it exits.
        command = argv
        if sys.platform.startswith("linux"):
            command = [sys.executable, "-c", _BOOTSTRAP, str(os.getpid()), *argv]
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True,
            )
        except OSError as error:
            self._start_error = f"could not start {argv[0]!r}: {error}"
            with self._cond:
                self._exitcode, self._exit_time = 127, time.time()
                self._cond.notify_all()
            ready.set()
            return
        self._proc = proc
        ready.set()
        readers = [
            threading.Thread(target=self._read, args=(stream, name), daemon=True)
            for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
        ]
        for reader in readers:
            reader.start()
        code = proc.wait()
        exit_time = time.time()
        for reader in readers:  # a grandchild holding the pipe must not hold the report back
            reader.join(READER_DRAIN_TIMEOUT)
        with self._cond:
            self._exitcode, self._exit_time = code, exit_time
            self._cond.notify_all()

    def _read(self, stream: IO[bytes] | None, name: str) -> None:
        if stream is None:
            return
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                with self._cond:
                    self._lines.append((name, line))
                    self._cond.notify_all()

    def poll(self, timeout: float) -> dict[str, Any]:
        """New output lines, waiting up to ``timeout`` s for some; the exit status once done."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._lines) or self._exitcode is not None, timeout)
            return self._report()

    def _report(self) -> dict[str, Any]:
        lines = self._lines[:MAX_LINES_PER_POLL]
        del self._lines[:MAX_LINES_PER_POLL]
        done = self._exitcode is not None and not self._lines
        report: dict[str, Any] = {"lines": lines, "exitcode": self._exitcode if done else None}
        if done:
            report["exit_time"] = self._exit_time
            report["stopped"] = self._stop_requested
            report["result"] = self._read_result() if self._exitcode == 0 else None
        return report

    def _read_result(self) -> bytes | None:
        try:
            with open(self._result_path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def stop(self, signum: int, grace: float) -> dict[str, Any]:
        """Send ``signum`` to the rank's process group, SIGKILL it after ``grace`` s, report."""
        with self._cond:
            already_done = self._exitcode is not None
            if not already_done:
                self._stop_requested = True
        proc = self._proc
        if proc is not None and not already_done:
            _signal_group(proc.pid, signum)
            with self._cond:
                self._cond.wait_for(lambda: self._exitcode is not None, grace)
            if self._exitcode is None:
                _signal_group(proc.pid, signal.SIGKILL)
                with self._cond:
                    self._cond.wait_for(lambda: self._exitcode is not None, 10.0)
        if proc is not None:  # anything the script left in its group goes too
            _signal_group(proc.pid, signal.SIGKILL)
        with self._cond:
            lines, self._lines = self._lines, []
            report = self._report()
            report["lines"] = lines
            return report

    def beat(self) -> Any:
        """The rank's heartbeat (a :class:`~distrain.heartbeat.Beat`), None before its first."""
        from distrain.launchers.ray_watch import rank_beat

        return rank_beat(self._watch_dir)

    def stacks(self, native: bool) -> Any:
        """The rank's stacks now (a :class:`~distrain.launchers.stack_collect.RankStacks`)."""
        from distrain.launchers.ray_watch import rank_stacks

        return rank_stacks(self._watch_dir, native=native)

    def collected(self, attempt: int) -> None:
        from distrain.launchers.ray_watch import mark_collected

        mark_collected(self._watch_dir, attempt)

    def kill_rank(self) -> None:
        """SIGKILL the rank's process group as a failure of its own (the hang watch's stop)."""
        if self._proc is not None:
            _signal_group(self._proc.pid, signal.SIGKILL)

    def close(self) -> None:
        """Release the store and the actor's temporary files (called before ``ray.kill``)."""
        self._store = None
        shutil.rmtree(self._tmp, ignore_errors=True)


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
