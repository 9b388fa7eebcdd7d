# One command each: `make demo` (install + the CPU demo training) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo search-demo chromium gpu-prep test lint docs clean

$(BIN)/.harma-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python .ci/fetch_peft_tests.py
	touch $@

install: $(BIN)/.harma-installed

demo: install
	$(BIN)/python examples/demo.py

# The CPU demo's adapters against the frozen backbone in archive search, then the page at
# http://127.0.0.1:8000/ (runs the CPU demo first when runs/demo holds no adapters).
search-demo: install
	$(BIN)/python -m pip install --quiet -e ".[search]"
	$(BIN)/python examples/search_demo.py

# Debian's Chromium for the browser test of the search page (as root; CI runs this).
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: install
	$(BIN)/python -m pytest -q

# The page checker lays every page out in headless Chromium at 1280 px (tables, code lines).
docs: install chromium
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
