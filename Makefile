# Two entry points, each sets up everything it needs on a fresh machine:
#   make experiment   - the main job
#   make test         - the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; on a GPU machine set TORCH="torch" (or your CUDA build) before `make`.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: setup test experiment bench
setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

experiment: $(VENV)/.installed
	$(PY) scripts/experiment.py --quick

bench: $(VENV)/.installed
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done
