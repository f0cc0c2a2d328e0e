"""The one-import API: ``import distrain`` gives the worker calls, ``ctx`` optional everywhere."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PYTHON, assert_ok, distrain, run_cmd

SCRIPT = Path(__file__).parent / "scripts" / "one_import.py"
PUBLIC = ("init", "wrap", "unwrap", "build_loader", "Checkpointer", "TBLogger", "cleanup", "print0",
          "Context", "all_reduce_mean", "barrier", "accumulate", "autocast", "grad_scaler")


def test_import_distrain_exports_the_worker_api_without_importing_torch() -> None:
    code = ("import sys, distrain; names = " + repr(PUBLIC) + "; "
            "assert set(names) <= set(distrain.__all__), names; "
            "assert 'torch' not in sys.modules; "
            "import distrain.ddp, distrain.ckpt, distrain.data, distrain.logging; "
            "assert distrain.init is distrain.ddp.init and distrain.wrap is distrain.ddp.wrap; "
            "assert distrain.Checkpointer is distrain.ckpt.Checkpointer; "
            "assert distrain.build_loader is distrain.data.build_loader; "
            "assert distrain.TBLogger is distrain.logging.TBLogger; print('ok')")
    result = run_cmd([PYTHON, "-c", code], timeout=120)
    assert_ok(result)
    assert result.stdout.strip() == "ok"


def test_unknown_name_is_an_attribute_error() -> None:
    import distrain as package

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        package.nope  # noqa: B018


def _run(tmp_path: Path, nproc: int) -> list[dict[str, object]]:
    result = distrain("launch", "--nproc-per-node", str(nproc), str(SCRIPT), env={"OUT_DIR": str(tmp_path)},
                      timeout=180)
    assert_ok(result)
    assert "done at step" in result.stdout
    return [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(nproc)]


def test_script_without_ctx_runs_on_two_ranks_and_resumes(tmp_path: Path) -> None:
    first = _run(tmp_path, 2)
    assert [r["world"] for r in first] == [2, 2]
    assert [r["step"] for r in first] == [2, 2]  # 16 samples, 2 ranks x batch 4
    assert first[0]["weight"] == first[1]["weight"]  # DDP kept the replicas equal
    second = _run(tmp_path, 2)  # resumes from the checkpoint: one more epoch
    assert [r["step"] for r in second] == [4, 4]
    assert (tmp_path / "tb").is_dir()


def test_script_without_ctx_runs_with_no_launcher(tmp_path: Path) -> None:
    result = run_cmd([PYTHON, str(SCRIPT)], env={"OUT_DIR": str(tmp_path)}, timeout=120)
    assert_ok(result)
    record = json.loads((tmp_path / "rank-0.json").read_text())
    assert record["world"] == 1 and record["step"] == 4


def test_current_context_is_forgotten_at_cleanup() -> None:
    code = ("import distrain; from distrain import group; ctx = distrain.init(); "
            "assert group.current() is ctx; distrain.cleanup(); "
            "again = group.current(); assert again is not ctx and again == ctx; print('ok')")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
