# One command each: `make demo` (install + the CPU demo training) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint docs clean

$(BIN)/.harma-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python .ci/fetch_peft_tests.py
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

clean:
	rm -rf $(VENV) build dist site *.egg-info
