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

# The main job: the comparison experiment at its reduced size (`--quick`, about 10 minutes on 2 CPU
# cores): pythia, infini, multi_memory and hierarchical trained on WikiText-2 from ../shared, then
# perplexity, Reversal Curse, passkey, recall; report in runs/experiment_quick/report.md.
# Without --quick (and on a GPU) it runs the seed's Pythia-70m sizes: see docs/experiment.md.
DATA_DIR ?= ../shared
EXPERIMENT_OUT ?= runs/experiment_quick
experiment: $(VENV)/.installed
	@if [ -f $(EXPERIMENT_OUT)/experiment.yaml ]; then \
		$(PY) scripts/experiment.py --resume $(EXPERIMENT_OUT) --data-dir $(DATA_DIR); \
	else \
		$(PY) scripts/experiment.py --quick --out $(EXPERIMENT_OUT) --data-dir $(DATA_DIR); \
	fi
	@echo "report: $(EXPERIMENT_OUT)/report.md"

bench: $(VENV)/.installed
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done
