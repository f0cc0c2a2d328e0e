"""A CSV with missing values -> pandas preprocessing -> tensors -> a regression on N ranks.

    distrain launch --nproc-per-node 2 examples/tabular_regression.py                 # generated CSV
    distrain launch --nproc-per-node 2 examples/tabular_regression.py --csv house.csv  # your own

The table looks like d2l's ``house_tiny.csv`` (NumRooms, Alley, Price), with missing numbers and
categories. Preprocessing is d2l's: numbers missing -> the column mean, categories -> one-hot
columns with a column for "missing" (``pd.get_dummies(..., dummy_na=True)``).

Preprocess on every rank, or once? Here on every rank, and that is the usual right answer for a
table that fits in memory: each rank reads the *whole* CSV and runs the same deterministic steps,
so every rank gets the same columns and the same fill values, with no communication; the loader
then gives each rank its own rows. Two things would go wrong otherwise: computing the mean (or the
set of categories) on a rank's shard only gives each rank different fill values and even a
different number of one-hot columns (the model's input width would differ between ranks); and
preprocessing once on rank 0 means sending the result to the others (a file plus a barrier, or a
broadcast), which pays only when preprocessing is slow (a large table, a tokenizer): then write
the tensors once on rank 0 (``torch.save``), ``ddp.barrier()``, and load them on every rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from distrain import ddp
from distrain.data import build_loader


def write_house_csv(path: Path, rows: int, seed: int = 0) -> None:
    """A house_tiny-like table: Price depends on NumRooms and Alley; ~20% of cells missing."""
    rng = np.random.default_rng(seed)
    rooms = rng.integers(1, 7, rows).astype(float)
    alley = rng.choice(["Pave", "Grvl"], rows)
    price = 50_000 + 25_000 * rooms + np.where(alley == "Pave", 20_000, 0) + rng.normal(0, 5_000, rows)
    table = pd.DataFrame({"NumRooms": rooms, "Alley": alley, "Price": price.round()})
    table.loc[rng.random(rows) < 0.2, "NumRooms"] = np.nan
    table.loc[rng.random(rows) < 0.3, "Alley"] = np.nan
    table.to_csv(path, index=False, na_rep="NA")


def preprocess(data: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """d2l's recipe: inputs = every column but the last, fill numbers, one-hot categories."""
    inputs, targets = data.iloc[:, :-1], data.iloc[:, -1]
    inputs = pd.get_dummies(inputs, dummy_na=True)  # Alley -> Alley_Grvl, Alley_Pave, Alley_nan
    inputs = inputs.fillna(inputs.mean())  # NumRooms: NA -> the column mean (whole table)
    x = torch.tensor(inputs.to_numpy(dtype=float), dtype=torch.float32)
    y = torch.tensor(targets.to_numpy(dtype=float), dtype=torch.float32).unsqueeze(1)
    return x, y, list(inputs.columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=None, help="a CSV whose last column is the target")
    parser.add_argument("--rows", type=int, default=2000, help="rows of the generated CSV")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--out-dir", default="runs/tabular")
    args = parser.parse_args()
    ctx = ddp.init()
    csv = Path(args.csv) if args.csv else Path(args.out_dir) / "house.csv"
    if args.csv is None:
        if ctx.is_main:  # one writer; the others wait for the file
            csv.parent.mkdir(parents=True, exist_ok=True)
            write_house_csv(csv, args.rows)
        ddp.barrier()
    x, y, columns = preprocess(pd.read_csv(csv, na_values="NA"))  # every rank, the whole table
    # Standardise with whole-table statistics too, so every rank scales the same way.
    x_mean, x_std = x.mean(0), x.std(0).clamp_min(1e-6)
    y_mean, y_std = y.mean(), y.std()
    data = TensorDataset((x - x_mean) / x_std, (y - y_mean) / y_std)
    ddp.print0(f"{len(data)} rows, inputs {columns}")
    loader = build_loader(data, ctx, batch_size=args.batch_size)
    torch.manual_seed(0)
    model = ddp.wrap(nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, 1)), ctx)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        total = count = 0.0
        for inputs, targets in loader:
            inputs, targets = inputs.to(ctx.device), targets.to(ctx.device)
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(inputs), count + len(inputs)
        mse = ddp.all_reduce_mean(total / max(count, 1))
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            rmse = (mse ** 0.5) * float(y_std)
            ddp.print0(f"epoch {epoch + 1}: train RMSE {rmse:,.0f} (price std {float(y_std):,.0f}, "
                       f"{ctx.world_size} ranks, {len(loader)} steps per epoch)")
    ddp.cleanup()


if __name__ == "__main__":
    main()
