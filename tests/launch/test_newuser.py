"""What a new user hit (issue 21), points 2, 3 and the launcher's small ones, with real processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import PYTHON, REPO, assert_ok, distrain, run_cmd

SCRIPT = str(REPO / "tests" / "scripts" / "newuser.py")
pytestmark = pytest.mark.timeout(200)


def test_dataparallel_on_several_ranks_is_an_error_naming_the_fix() -> None:
    result = distrain("launch", "--nproc-per-node", "2", SCRIPT, "dp", timeout=180)
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert "strategy='dp' is invalid: expected one process per machine for DataParallel (this job has 2)" \
        in text, text[-3000:]


def test_dataparallel_without_gpu_says_so_without_any_logging_setup() -> None:
    result = run_cmd([PYTHON, SCRIPT, "dp"], timeout=120)
    assert_ok(result)
    assert "wrapped Linear" in result.stdout
    assert "DataParallel asked for but no GPU is visible" in result.stderr, result.stderr[-2000:]


def test_ranks_that_never_form_a_group_get_one_warning() -> None:
    result = distrain("launch", "--nproc-per-node", "2", SCRIPT, "nogroup", timeout=180)
    assert_ok(result)
    text = result.stdout + result.stderr
    assert "trained alone 0" in text and "trained alone 1" in text
    assert text.count("the 2 ranks never formed a process group") == 1, text[-3000:]


def test_launcher_options_after_the_script_are_flagged() -> None:
    result = distrain("launch", SCRIPT, "plain", "--nproc-per-node", "2", timeout=180)
    assert_ok(result)
    assert "plain run, world 1 argv ['plain', '--nproc-per-node', '2']" in result.stdout
    assert ("distrain launch: warning: --nproc-per-node after " + SCRIPT + " went to the script, not the "
            "launcher") in result.stderr, result.stderr[-2000:]


def test_launcher_option_from_the_environment_is_named_as_such() -> None:
    result = distrain("launch", SCRIPT, env={"PET_NPROC_PER_NODE": "abc"}, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "distrain launch: error: PET_NPROC_PER_NODE='abc' (read as --nproc-per-node): "), lines


def test_each_restart_is_one_line_and_tracebacks_carry_one_rank_prefix() -> None:
    result = distrain("launch", "--start-method", "spawn", "--max-restarts", "1", "--nproc-per-node", "2",
                      SCRIPT, "raise_once", timeout=180)
    assert_ok(result)
    text = result.stdout + result.stderr
    assert "distrain: restart 1 of 1: rank 1 exit code 1: ConnectionResetError: peer gone" in text, \
        text[-3000:]
    assert "[rank1]:Traceback" in text and "[rank1]:[rank1]:" not in text, text[-3000:]
    assert "attempt 1 rank 0" in text and "attempt 1 rank 1" in text


def test_loading_another_models_checkpoint_is_one_line_naming_it(tmp_path: Path) -> None:
    assert_ok(distrain("launch", "--nproc-per-node", "2", SCRIPT, "save_small", str(tmp_path), timeout=180))
    result = distrain("launch", "--nproc-per-node", "2", SCRIPT, "load_big", str(tmp_path), timeout=180)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "CheckpointError:" in line]
    assert lines, (result.stdout + result.stderr)[-3000:]
    expected = (f"checkpoint {tmp_path / 'step-00000005'}: its model does not fit this model (shape "
                "2.weight saved [3, 16] here [10, 16]; 2.bias saved [3] here [10]); is it another model's "
                "checkpoint directory?")
    assert all(line.endswith(expected) for line in lines), lines
    assert "Error(s) in loading state_dict" not in result.stdout + result.stderr


def test_tutorial_tags_embeddings_images_and_figures_read_back_and_report(tmp_path: Path) -> None:
    from google.protobuf import text_format
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    for _ in range(2):  # a run, then its resume (a second event file)
        result = distrain("launch", "--nproc-per-node", "2", SCRIPT, "tutorial_tb", str(tmp_path),
                          timeout=180)
        assert_ok(result)
        assert "writer rank0 SummaryWriter" in result.stdout and "writer rank1 NoneType" in result.stdout
    tb = tmp_path / "tb"
    reader = EventAccumulator(str(tb), size_guidance={IMAGES: 0})
    reader.Reload()
    assert {"first_image", "inputs", "curve"} <= set(reader.Tags()["images"]), reader.Tags()
    first = reader.Images("first_image")[-1]
    assert (first.step, first.width, first.height) == (6, 8, 8)
    assert reader.Images("inputs")[-1].width > 8  # a grid of the batch
    assert reader.Images("curve")[-1].width == 200  # the 2-inch figure at 100 dpi
    config = text_format.Parse((tb / "projector_config.pbtxt").read_text(), ProjectorConfig())
    embedding = config.embeddings[-1]
    assert embedding.tensor_name == "default:00006" and embedding.tensor_path == "00006/default/tensors.tsv"
    assert (tb / embedding.metadata_path).read_text().split() == ["0", "1", "2", "0", "1", "2"]
    assert list(embedding.sprite.single_image_dim) == [8, 8]
    assert (tb / embedding.sprite.image_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tb / embedding.tensor_path).read_text().splitlines()) == 6

    report = distrain("report", str(tmp_path), "--out", str(tmp_path / "r.png"), timeout=60)
    assert report.returncode == 0, report.stderr
    assert ("(loss: Loss/train; accuracy: Accuracy/test; throughput: none; restarted or resumed at "
            "step 4)") in report.stdout, report.stdout
    assert report.stderr == "", report.stderr  # no reader warnings passed through
    tagged = distrain("report", str(tmp_path), "--out", str(tmp_path / "t.png"), "--tags", "LOSS*",
                      timeout=60)
    assert "(LOSS*: Loss/train; restarted or resumed at step 4)" in tagged.stdout, tagged.stdout
