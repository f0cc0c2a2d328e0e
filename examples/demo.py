"""``make demo``: train digits on 2 processes, kill a worker partway, watch it restart and resume.

1. ``distrain launch --nproc-per-node 2 --max-restarts 1 examples/digits_ddp.py`` in the background;
2. once two epochs are checkpointed, SIGKILL one worker (a real crash);
3. the launcher restarts the group, the script resumes from its newest checkpoint and finishes;
4. then the final accuracy, where checkpoints and logs are, the TensorBoard command and a
   report PNG drawn from the event files (``distrain report``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def workers_of(launcher: psutil.Process) -> list[psutil.Process]:
    """The training processes under the launcher: forked from its server, or spawned."""
    for child in launcher.children():
        try:
            if "forkserver" in " ".join(child.cmdline()):
                return child.children()
        except psutil.Error:
            continue
    return [p for p in launcher.children() if "digits_ddp.py" in " ".join(p.cmdline())]


def wait_for_checkpoints(ckpt_dir: Path, count: int, launcher: subprocess.Popen[bytes]) -> None:
    while len(list(ckpt_dir.glob("step-*"))) < count:
        if launcher.poll() is not None:
            raise SystemExit(f"demo: the run ended before {count} checkpoints "
                             f"(exit {launcher.returncode})")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "distrain", "launch", "--nproc-per-node", "2", "--max-restarts", "1",
               "--log-dir", str(run_dir / "logs"), str(REPO / "examples" / "digits_ddp.py"),
               "--epochs", str(args.epochs), "--run-dir", str(run_dir)]
    print("demo: $", " ".join(command[2:]).replace(sys.executable, "python"), flush=True)
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    launcher = subprocess.Popen(command, env=env)
    killed = False
    try:
        wait_for_checkpoints(run_dir / "ckpt", 2, launcher)
        victims = workers_of(psutil.Process(launcher.pid))
        if victims:
            victim = victims[-1]
            print(f"\ndemo: >>> killing worker pid {victim.pid} with SIGKILL (a crash); "
                  "--max-restarts 1 lets the launcher restart the group <<<\n", flush=True)
            try:
                victim.send_signal(signal.SIGKILL)
                killed = True
            except psutil.NoSuchProcess:
                pass
        if not killed:  # the run got past its last epoch first: say so rather than claim a crash
            print("demo: no worker left to kill; the run goes on without a crash", file=sys.stderr)
        code = launcher.wait(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    if code != 0:
        print(f"demo: the run failed with exit code {code}", file=sys.stderr)
        return code
    latest = sorted((run_dir / "ckpt").glob("step-*"))[-1]
    accuracy = json.loads((latest / "extra.json").read_text()).get("extra", {}).get("eval/accuracy")
    report = run_dir / "report.png"
    subprocess.run([sys.executable, "-m", "distrain", "report", str(run_dir / "tb"), "--out", str(report)],
                   env=env, check=True)
    print("\ndemo: finished after a crash and an automatic restart + resume" if killed
          else "\ndemo: finished (no worker was killed)")
    if accuracy is not None:
        print(f"demo: final test accuracy  {accuracy:.4f}")
    print(f"demo: checkpoints          {run_dir / 'ckpt'} (newest: {latest.name})")
    print(f"demo: per-rank logs        {run_dir / 'logs'}")
    print(f"demo: TensorBoard          tensorboard --logdir {run_dir / 'tb'}")
    print(f"demo: report               {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
