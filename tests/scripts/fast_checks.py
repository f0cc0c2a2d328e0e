"""Behaviours a worker must see whether it is a fresh interpreter or forked from the preloaded server."""

import json
import multiprocessing
import os
import sys
from pathlib import Path

import sibling_helper  # sys.path[0] must be this script's directory
import torch
from torch.utils.data import DataLoader, TensorDataset


def square(x: int) -> int:
    return x * x


if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")  # a script may pick its own start method
    with multiprocessing.Pool(2) as pool:
        squares = pool.map(square, [1, 2, 3])
    loader = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2, num_workers=2)
    total = sum(float(batch[0].sum()) for batch in loader)
    result = {
        "sibling": sibling_helper.VALUE,
        "path0": sys.path[0],
        "argv": sys.argv,
        "squares": squares,
        "loader_total": total,
        "cuda_initialized": torch.cuda.is_initialized(),
    }
    Path(os.environ["OUT_DIR"], f"fast-{os.environ['RANK']}.json").write_text(json.dumps(result))
