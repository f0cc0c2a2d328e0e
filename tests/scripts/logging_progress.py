"""Console output of a short fake epoch: config table, progress (bar or lines), summary.

Run by tests/logging/test_logging_progress.py with stdout on a pipe or on a pseudo-terminal.
"""

from __future__ import annotations

import sys

from distrain.logging import EpochProgress, print_config, print_summary


def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    print_config({"lr": 0.1, "batch_size": 32, "model": {"depth": 4}})
    with EpochProgress(None, total=total, epoch=1) as bar:
        for step in range(1, total + 1):
            bar.update(loss=1.0 / step, samples_per_s=100.0 * step)
    print_summary(steps=total, seconds=2.0, samples=64 * total, metrics={"train/loss": 0.05},
                  ckpt_dir="runs/x/ckpt", log_dir="runs/x/tb")


if __name__ == "__main__":
    main()
