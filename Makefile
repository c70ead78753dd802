# Two commands do all the set-up: `make demo` and `make test`.
# Each creates (or reuses) a virtual environment in $(VENV) and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch is installed first, pinned, and only where the environment has none: an unpinned `torch`
# requirement pulled in by a dependency could fetch a newer multi-GB CUDA build. Point pip at a CPU
# wheel index (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL) or override TORCH_SPEC to choose the build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.rmge-installed

.PHONY: demo test lint bench clean install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rmge demo --output rmge_demo_output

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) rmge_demo_output .pytest_cache .ruff_cache
