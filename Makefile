# Every target creates .venv from constraints.txt when it is missing (about 2 minutes, 6.4 GB).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: venv test gpu-test lint demo bench stress clean

venv: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# GPU tests (tests/gpu, marker gpu) need a CUDA GPU: `make test` deselects them, `make gpu-test` runs
# only them. On a GPU machine with torch already installed: `make gpu-test PY=python3` (no venv made).
# Two xdist workers: most tests wait on processes they started, so two at a time use both cores;
# three were no faster (22:29 vs 22:45) and pushed a timed launch test past its bound.
# (tests/conftest.py keeps each module, all loopback-Ray tests and the SLURM modules on one worker each).
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not gpu" -n $(TEST_WORKERS) --dist loadscope --durations=40

gpu-test: $(if $(filter command line,$(origin PY)),,venv)
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m pytest -q -p no:cacheprovider -m gpu tests/gpu

lint: venv
	$(VENV)/bin/ruff check distrain tests examples bench
	$(VENV)/bin/mypy

demo: venv
	$(PY) examples/demo.py --run-dir runs/demo

bench: venv
	$(PY) bench/run_all.py

stress: venv
	$(PY) bench/teardown_stress.py

clean:
	rm -rf runs bench/results.json
