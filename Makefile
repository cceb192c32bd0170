# obd: every target builds what it needs, starting with the virtualenv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TASK ?= halfcheetah-medium
SIZE ?=
# TORCH=cpu (default without a GPU): the CPU build 2.13.0; TORCH=cuda (default where nvidia-smi sees a GPU):
# PyPI's default (CUDA) build; TORCH=keep: whatever torch the environment already has.
TORCH ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: venv test test-fast check bench train sweep sweep-worker report dashboard gpu-check data table table-worker curves misalignment clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ "$(TORCH)" = cpu ]; then $(PY) -m pip install -q torch==2.13.0; \
	elif [ "$(TORCH)" = cuda ]; then $(PY) -m pip install -q 'torch>=2.4'; fi
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

check: venv
	$(VENV)/bin/ruff check obd tests
	$(VENV)/bin/ruff format --check obd tests
	$(VENV)/bin/mypy

# one test process per core (pytest-xdist): every test has its own directories, servers and ports
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto

test-fast: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto -m "not slow" --timeout 120

data: venv
	$(PY) -m obd.data collect $(TASK) $(if $(SIZE),--size $(SIZE))

bench: venv
	$(PY) -m obd.bench

train: venv
	$(PY) -m obd.train --task $(TASK) $(if $(METHOD),--method $(METHOD)) $(if $(BUDGET),--budget $(BUDGET))

SWEEP_ARGS = --task $(TASK) $(if $(TRIALS),--trials $(TRIALS)) $(if $(SEEDS),--seeds $(SEEDS)) \
	$(if $(BUDGET),--budget $(BUDGET)) $(if $(STORAGE),--storage $(STORAGE)) $(if $(OUT),--out $(OUT)) \
	$(if $(METHODS),--methods $(METHODS)) $(if $(DEVICE),--device $(DEVICE)) \
	$(if $(BATCH_TRIALS),--batched --batch-trials $(BATCH_TRIALS))

sweep: venv
	$(PY) -m obd.sweep $(SWEEP_ARGS)

sweep-worker: venv
	$(PY) -m obd.sweep $(SWEEP_ARGS) --worker

report: venv
	$(PY) -m obd.report --task $(TASK) $(if $(OUT),--out $(OUT))

# SDW vs Av-PBC (and random pairs) on many datasets: results/BUDGET/table.{csv,md,png}; resumable
TABLE_ARGS = $(if $(TASKS),--tasks $(TASKS)) $(if $(BUDGET),--budget $(BUDGET)) $(if $(SEEDS),--seeds $(SEEDS)) \
	$(if $(METHODS),--methods $(METHODS)) $(if $(OUT),--out $(OUT)) $(if $(STORAGE),--storage $(STORAGE))

table: venv
	$(PY) -m obd.table $(TABLE_ARGS)

# an extra process (on any machine) taking cells of the table on STORAGE
table-worker: venv
	$(PY) -m obd.table $(TABLE_ARGS) --worker

# where each dataset's plateau is: results/curves/{curves.csv,plateau.csv,TASK.png}; resumable
curves: venv
	$(PY) -m obd.curves $(if $(TASKS),--tasks $(TASKS)) $(if $(METHODS),--methods $(METHODS)) $(if $(SEEDS),--seeds $(SEEDS)) \
		$(if $(STEPS),--outer-steps $(STEPS)) $(if $(OUT),--out $(OUT))

# does the ranking of datasets flip between high and low behaviour-cloning loss? results/misalignment-ENV/
misalignment: venv
	$(PY) -m obd.misalignment $(if $(ENV),--env $(ENV)) $(if $(KINDS),--kinds $(KINDS))

# the GPU checks (CUDA-marked tests, batched figures on cuda) as one JSON line; skips cleanly without a GPU
gpu-check: venv
	$(PY) -m obd.gpu_check

# optuna-dashboard on the study's storage (a standard Optuna RDB; the `optuna` CLI reads it too)
DB = $(or $(OUT),runs/sweep-$(TASK))/study.db
dashboard: venv
	@if [ -z "$(STORAGE)" ] && [ ! -f "$(DB)" ]; then \
		echo "error: no study at $(DB); run \`make sweep TASK=$(TASK)\` first (or give OUT=... or STORAGE=...)" >&2; exit 2; fi
	$(PY) -m pip install -q 'optuna-dashboard>=0.16'
	$(VENV)/bin/optuna-dashboard $(or $(STORAGE),sqlite:///$(DB)) --host 127.0.0.1 --port $(or $(PORT),8080)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
