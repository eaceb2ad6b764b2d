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

# Until the comparison experiment (scripts/experiment.py) lands, the main job is the quickest real
# thing: the real pretrained SmolLM2-135M (GGUF) on WikiText-2 test, sliding-window perplexity on a
# prefix, then a greedy completion.
DATA_DIR ?= ../shared
SMOLLM ?= $(DATA_DIR)/models/SmolLM2-135M-Instruct.Q4_1.gguf
experiment: $(VENV)/.installed
	$(VENV)/bin/newllm info $(SMOLLM)
	$(VENV)/bin/newllm eval ppl --model $(SMOLLM) --data wikitext-2 --split test --data-dir $(DATA_DIR) \
		--context 1024 --stride 512 --limit-tokens 8192
	$(VENV)/bin/newllm generate $(SMOLLM) "The capital of France is" --max-new-tokens 12

bench: $(VENV)/.installed
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done
