# Two commands set up a fresh machine: `make train` and `make test`. Both are idempotent:
# the virtual environment is (re)built only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: train test test-fast lint format clean-runs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

train: $(VENV)/.runtime  ## train the default (LeNet-5 on the bundled digits); pass overrides as ARGS="..."
	$(BIN)/python -m pipeline.train $(ARGS)

test: $(VENV)/.dev  ## lint, then the whole test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(VENV)/.dev  ## lint, then every test that neither starts processes nor trains (the minutes-long loop)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not e2e and not slow" $(ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
