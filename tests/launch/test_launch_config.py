"""Flag parsing and validation: no processes started. Bad input -> exit 2, one line, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from distrain import cli
from distrain.errors import ConfigError
from distrain.launch_cli import config_from_args, parse_endpoint, parse_launch_args, parse_nnodes
from tests.helpers import distrain

SCRIPT = str(Path(__file__).parents[1] / "scripts" / "dump_env.py")


def _config(*argv: str, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return config_from_args(parse_launch_args(list(argv), environ=environ or {}))


def test_torchrun_defaults_and_both_spellings() -> None:
    dashed = _config("--nproc-per-node", "2", "--max-restarts", "1", SCRIPT, "--epochs", "3")
    under = _config("--nproc_per_node", "2", "--max_restarts", "1", SCRIPT, "--epochs", "3")
    assert dashed == under
    assert dashed.nproc_per_node == 2 and dashed.max_restarts == 1
    assert dashed.args == ("--epochs", "3")
    assert (dashed.min_nodes, dashed.max_nodes, dashed.rdzv_backend) == (1, 1, "static")
    assert dashed.master_port is None and dashed.term_timeout == 30.0


def test_options_come_from_pet_environment_variables() -> None:
    config = _config(SCRIPT, environ={"PET_NPROC_PER_NODE": "3", "PET_MAX_RESTARTS": "2",
                                      "PET_STANDALONE": "1"})
    assert (config.nproc_per_node, config.max_restarts, config.standalone) == (3, 2, True)
    # the command line wins over the environment
    assert _config("--nproc-per-node", "1", SCRIPT, environ={"PET_NPROC_PER_NODE": "3"}).nproc_per_node == 1


def test_nproc_keywords_and_node_ranges() -> None:
    assert _config("--nproc-per-node", "cpu", SCRIPT).nproc_per_node >= 1
    assert _config("--nproc-per-node", "auto", SCRIPT).nproc_per_node >= 1
    assert parse_nnodes("2") == (2, 2) and parse_nnodes("1:4") == (1, 4)
    config = _config("--nnodes", "1:3", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", SCRIPT)
    assert (config.min_nodes, config.max_nodes) == (1, 3)
    assert parse_endpoint("[::1]:29400") == ("[::1]", 29400)
    assert parse_endpoint("node0") == ("node0", None)


def test_module_and_no_python_entrypoints_validate() -> None:
    assert _config("-m", "json.tool").module
    config = _config("--no-python", "/bin/true", "x")
    assert config.no_python and config.entrypoint == "/bin/true"


BAD_INPUTS: list[tuple[list[str], str]] = [
    (["--nproc-per-node", "0", SCRIPT], "--nproc-per-node='0'"),
    (["--nproc-per-node", "-1", SCRIPT], "--nproc-per-node='-1'"),
    (["--nproc-per-node", "abc", SCRIPT], "--nproc-per-node='abc'"),
    (["--nnodes", "3:2", SCRIPT], "--nnodes='3:2'"),
    (["--nnodes", "0", SCRIPT], "--nnodes=0"),
    (["--nnodes", "1:2:3", SCRIPT], "--nnodes='1:2:3'"),
    (["--nnodes", "two", SCRIPT], "--nnodes='two'"),
    (["--nnodes", "2", "--node-rank", "2", "--master-port", "29500", SCRIPT], "--node-rank=2"),
    (["--node-rank", "-1", SCRIPT], "--node-rank=-1"),
    ([], "script=None"),
    (["does/not/exist.py"], "script='does/not/exist.py'"),
    ([str(Path(__file__).parent)], "not a directory"),
    (["-m", "no_such_module_xyz"], "-m='no_such_module_xyz'"),
    (["--master-port", "70000", SCRIPT], "--master-port=70000"),
    (["--master-port", "http", SCRIPT], "--master-port='http'"),
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "host:port:9", SCRIPT], "--rdzv-endpoint='host:port:9'"),
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "host:99999", SCRIPT], "--rdzv-endpoint='host:99999'"),
    (["--max-restarts", "-1", SCRIPT], "--max-restarts=-1"),
    (["--rdzv-backend", "etcd", SCRIPT], "--rdzv-backend='etcd'"),
    (["--monitor-interval", "0", SCRIPT], "--monitor-interval=0.0"),
    (["--start-method", "thread", SCRIPT], "--start-method='thread'"),
    (["--redirects", "7", SCRIPT], "--redirects='7'"),
    (["--tee", "5:3", "--nproc-per-node", "2", SCRIPT], "--tee='5:3'"),
    (["--local-ranks-filter", "a,b", SCRIPT], "--local-ranks-filter='a,b'"),
    (["--local-ranks-filter", "4", "--nproc-per-node", "2", SCRIPT], "--local-ranks-filter='4'"),
    (["--rdzv-conf", "timeout", SCRIPT], "--rdzv-conf='timeout'"),
    (["--no-python", "-m", "json.tool"], "-m/--no-python"),
    (["--term-timeout", "-5", SCRIPT], "--term-timeout=-5.0"),
    (["--nnodes", "2", SCRIPT], "--master-port=None"),
    (["--standalone", "--nnodes", "2", "--master-port", "29500", SCRIPT], "--standalone"),
    (["--nnodes", "2", "--rdzv-backend", "c10d", SCRIPT], "--rdzv-endpoint=''"),
    (["--nnodes", "1:2", "--master-port", "29500", SCRIPT], "--nnodes='1:2'"),
    (["--log-dir", __file__, SCRIPT], "--log-dir="),
    (["--launcher", "slurm", SCRIPT], "--launcher='slurm'"),
    (["--master-addr", "", SCRIPT], "--master-addr=''"),
    (["--placement-strategy", "RANDOM", SCRIPT], "--placement-strategy='RANDOM'"),
    (["--num-workers", "0", SCRIPT], "--num-workers=0"),
]


@pytest.mark.parametrize(("argv", "names"), BAD_INPUTS, ids=[" ".join(a[:2]) or "-" for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["launch", *argv])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert names in lines[0], lines[0]
    assert "expected" in lines[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["launch", "--nprocs-per-node", "2", SCRIPT], "did you mean --nproc-per-node?"),
        (["launch", "--max-restart", "2", SCRIPT], "did you mean --max-restarts?"),
        (["lanch"], "invalid choice: 'lanch'"),
        (["launch", "--nnodes"], "expected one argument"),
        (["launch", "--node-rank", "x", SCRIPT], "invalid int value: 'x'"),
    ],
)
def test_argparse_errors_are_one_line_exit_2(argv: list[str], needle: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err


def test_pet_variable_with_a_bad_value(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PET_NPROC_PER_NODE", "many")
    assert cli.main(["launch", SCRIPT]) == 2
    assert "--nproc-per-node='many'" in capsys.readouterr().err


def test_config_error_names_value_expectation_and_fix() -> None:
    error = ConfigError("--nnodes", "3:2", "1 <= MIN <= MAX", "use --nnodes 2")
    assert str(error) == "--nnodes='3:2' is invalid: expected 1 <= MIN <= MAX; use --nnodes 2"


@pytest.mark.timeout(60)
def test_real_cli_process_prints_one_line_without_traceback() -> None:
    result = distrain("launch", "--master-port", "70000", SCRIPT)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "--master-port=70000" in result.stderr and result.stdout == ""
    result = distrain("launch", "--unknown-flag", SCRIPT)
    assert result.returncode == 2 and "unrecognized arguments: --unknown-flag" in result.stderr


def test_help_groups_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["launch", "--help"])
    out = capsys.readouterr().out
    for group in ("workers and nodes:", "rendezvous:", "failures and signals:", "logs:",
                  "ray launcher (--launcher ray):", "what to run:"):
        assert group in out
