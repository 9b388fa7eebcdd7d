# One command each: `make demo` (install + the CPU demo training) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint docs clean gpu-prep

$(BIN)/.harma-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.harma-installed

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest -q

docs: install
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	$(BIN)/python .ci/check_api_pages.py site

lint: install
	$(BIN)/ruff check .

# What the GPU check carries to a GPU machine: wheels of the packages it lacks, RSITMD annotation
# files (benchmarks/gpu_prep.py; docs/performance.md). From a worktree elsewhere, give SHARED_DATA.
SHARED_DATA ?= ../shared/data
gpu-prep:
	$(PYTHON) benchmarks/gpu_prep.py --shared-data $(SHARED_DATA)

clean:
	rm -rf $(VENV) build dist site *.egg-info
