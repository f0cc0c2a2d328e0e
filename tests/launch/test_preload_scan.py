"""--preload auto: the fast-start server also imports the script's top-level imports (pure parts
here; the end-to-end check is in test_launch_local.py)."""

from __future__ import annotations

from pathlib import Path

from distrain.launchers.preload_scan import resolve_preload, script_imports, top_level_imports, usable_cores


def test_top_level_imports_are_read_without_running_the_script() -> None:
    source = '''
from __future__ import annotations
import os, numpy as np
import torch.nn
from sklearn.datasets import load_digits
from . import relative
try:
    import tensorboardX
except ImportError:
    tensorboardX = None
if True:
    import tqdm
def main():
    import matplotlib  # inside a function: not at import time
raise SystemExit("never run")
'''
    assert top_level_imports(source) == ["__future__", "os", "numpy", "torch.nn", "sklearn.datasets",
                                         "tensorboardX", "tqdm"]
    assert top_level_imports("def broken(:\n") == []


def test_the_scripts_own_modules_and_thread_starting_ones_are_left_out(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("X = 1\n")
    (tmp_path / "mypkg").mkdir()
    script = tmp_path / "train.py"
    script.write_text("import helpers\nimport mypkg.models\nimport ray\nimport torch\n"
                      "import sklearn.datasets\n")
    assert script_imports(str(script), module=False) == ["torch", "sklearn.datasets"]
    crowded = {"nproc": 4, "cores": 2}  # more ranks than cores: auto preloads the imports
    assert resolve_preload(("auto", "torch"), str(script), module=False, **crowded) == (
        ["torch"], ["sklearn.datasets", "torch._dynamo"])
    assert resolve_preload(("torch",), str(script), module=False, **crowded) == (["torch"], [])
    # DDP and the first optimizer step import torch._dynamo, even where torch comes in indirectly
    bare = tmp_path / "bare.py"
    bare.write_text("import mypkg.models\n")
    assert resolve_preload(("auto",), str(bare), module=False, **crowded) == ([], ["torch._dynamo"])
    assert script_imports(str(tmp_path / "missing.py"), module=False) == []


def test_a_module_entrypoint_leaves_out_its_own_package() -> None:
    found = script_imports("distrain.cli", module=True)
    assert found and not any(name.split(".")[0] == "distrain" for name in found)


def test_auto_preloads_the_scripts_imports_only_when_ranks_outnumber_cores(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("import torch\nimport sklearn.datasets\n")
    found = ["torch", "sklearn.datasets", "torch._dynamo"]
    for nproc, cores, auto in ((2, 2, []), (8, 64, []), (3, 2, found), (16, 2, found)):
        assert resolve_preload(("auto",), str(script), module=False, nproc=nproc, cores=cores) == ([], auto)
        # "script" always does; a named module is always preloaded
        assert resolve_preload(("script", "tqdm"), str(script), module=False, nproc=nproc,
                               cores=cores) == (["tqdm"], found)
    assert usable_cores() >= 1
