# obd: every target builds what it needs, starting with the virtualenv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TASK ?= halfcheetah-medium
SIZE ?=


.PHONY: venv test data bench train sweep sweep-worker report clean

venv: $(STAMP)

# torch first and exactly 2.13.0 (the local CPU build); the pins in pyproject.toml keep it there.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

data: venv
	$(PY) -m obd.data collect $(TASK) $(if $(SIZE),--size $(SIZE))

bench: venv
	$(PY) -m obd.bench

train: venv
	$(PY) -m obd.train --task $(TASK) $(if $(METHOD),--method $(METHOD)) $(if $(BUDGET),--budget $(BUDGET))

SWEEP_ARGS = --task $(TASK) $(if $(TRIALS),--trials $(TRIALS)) $(if $(SEEDS),--seeds $(SEEDS)) \
	$(if $(BUDGET),--budget $(BUDGET)) $(if $(STORAGE),--storage $(STORAGE)) $(if $(OUT),--out $(OUT)) \
	$(if $(METHODS),--methods $(METHODS))

sweep: venv
	$(PY) -m obd.sweep $(SWEEP_ARGS)

sweep-worker: venv
	$(PY) -m obd.sweep $(SWEEP_ARGS) --worker

report: venv
	$(PY) -m obd.report --task $(TASK) $(if $(OUT),--out $(OUT))

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
