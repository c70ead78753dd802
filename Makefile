# Two commands do all the set-up: `make demo` and `make test`.
# Each creates (or reuses) a virtual environment in $(VENV) and installs what it needs.
#
#   make test                                   # default python3, newest scvi-tools that fits it
#   make test PYTHON=python3.11 VENV=.venv311 SCVI_SPEC="scvi-tools==1.4.2"
#   make docs                                   # HTML documentation in docs/_build/html
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch is installed first, pinned, and only where the environment has none: an unpinned `torch`
# requirement pulled in by a dependency could fetch a newer multi-GB CUDA build. Every later install
# pins torch to the version already there, so pip never replaces it. Point pip at a CPU wheel index
# (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL) or override TORCH_SPEC to choose the build.
TORCH_SPEC ?= torch==2.13.0
# Optional requirement installed with rmge, e.g. SCVI_SPEC="scvi-tools==1.4.2" to test one scvi-tools.
SCVI_SPEC ?=
SPEC_TAG := $(if $(SCVI_SPEC),-$(shell printf '%s' '$(SCVI_SPEC)' | cksum | cut -d' ' -f1))
STAMP := $(VENV)/.rmge-installed$(SPEC_TAG)
DOCS_STAMP := $(VENV)/.rmge-docs-installed$(SPEC_TAG)
PIP_INSTALL := $(BIN)/python -m pip install --quiet
TORCH_PIN = "torch==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("torch"))')"
SPHINXOPTS ?= -W --keep-going

.PHONY: demo test test-tutorials lint bench docs clean install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e ".[test]" $(TORCH_PIN) $(if $(SCVI_SPEC),"$(SCVI_SPEC)")
	touch $@

$(DOCS_STAMP): $(STAMP)
	$(PIP_INSTALL) -e ".[test,docs]" $(TORCH_PIN) $(if $(SCVI_SPEC),"$(SCVI_SPEC)")
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rmge demo --output rmge_demo_output

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow"

# Only the tutorial notebooks (also part of `make test`): run with small settings (RMGE_TUTORIAL_FAST=1).
test-tutorials: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_tutorials.py

docs: $(DOCS_STAMP)
	$(BIN)/sphinx-build $(SPHINXOPTS) -b html docs docs/_build/html

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) rmge_demo_output .pytest_cache .ruff_cache docs/_build docs/generated docs/tutorials
