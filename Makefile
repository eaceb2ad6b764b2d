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

.PHONY: setup test experiment bench llamacpp-check diagnostics-smollm
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

# The llama.cpp side of `newllm trace` (docs/diagnostics.md). llama-cpp-python has no wheel on PyPI:
# pip builds it from source (about 13 minutes on 2 CPU cores the first time, then from pip's wheel
# cache), with a generic x86 build (the native build was seen to segfault on an AMX Xeon). Not part of
# `make test` / CI: the build alone would take half of CI's 25 minutes on a fresh machine.
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
$(VENV)/.llamacpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[dev,llamacpp]"
	touch $@

llamacpp-check: $(VENV)/.llamacpp
	$(PY) -m pytest -q checks/llamacpp

# SmolLM2-135M: newllm vs transformers vs llama.cpp, growth with depth, the quantisation table
# (about 15 minutes on 2 cores; docs/diagnostics.md reports its numbers)
diagnostics-smollm: $(VENV)/.llamacpp
	$(PY) scripts/diagnostics_smollm.py --data-dir $(DATA_DIR) --out runs/diagnostics_smollm
