# obd: every target builds what it needs, starting with the virtualenv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TASK ?= halfcheetah-medium
SIZE ?=
export OMP_NUM_THREADS ?= 1

.PHONY: venv test data bench train clean

venv: $(STAMP)

# torch first and exactly 2.13.0 (the local CPU build); the pins in pyproject.toml keep it there.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: venv
	$(PY) -m pytest -q

data: venv
	$(PY) -m obd.data collect $(TASK) $(if $(SIZE),--size $(SIZE))

bench: venv
	$(PY) -m obd.bench

train: venv
	$(PY) -m obd.train --task $(TASK) $(if $(METHOD),--method $(METHOD)) $(if $(BUDGET),--budget $(BUDGET))

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
