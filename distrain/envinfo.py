"""``distrain env``: versions, devices, backends and the distributed variables currently set."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Mapping, Sequence

from distrain.env import CONTRACT_KEYS
from distrain.errors import ConfigError, usage_error
from distrain.launchers.slurm_env import describe, detect

PACKAGES = ("torch", "torchvision", "ray", "tensorboardX", "distrain")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def rows() -> list[tuple[str, str]]:
    import torch
    import torch.distributed as dist

    table = [("python", platform.python_version()), ("platform", platform.platform())]
    table += [(name, _version(name)) for name in PACKAGES]
    cuda = torch.cuda.is_available()
    table.append(("cuda available", str(cuda)))
    table.append(("cuda devices", str(torch.cuda.device_count() if cuda else 0)))
    table.append(("cpu cores", str(os.cpu_count())))
    table.append(("gloo", str(dist.is_available() and dist.is_gloo_available())))
    table.append(("nccl", str(dist.is_available() and dist.is_nccl_available())))
    extra = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "DISTRAIN_PROGRESS")
    for key in (*CONTRACT_KEYS, *extra):
        if key in os.environ:
            table.append((f"${key}", os.environ[key]))
    return table + slurm_rows(os.environ)


def slurm_rows(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """What ``distrain launch`` would take from SLURM here; a bad variable is shown, not raised."""
    try:
        return describe(detect(environ))
    except ConfigError as error:
        return [("slurm", f"unusable: {error}")]


def main(argv: Sequence[str] = ()) -> int:
    if argv:
        return usage_error("distrain env", f"unexpected argument {argv[0]!r}; it takes none")
    table = rows()
    width = max(len(key) for key, _ in table)
    for key, value in table:
        print(f"{key:<{width}}  {value}")
    return 0
