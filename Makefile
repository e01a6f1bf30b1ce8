# Two commands set up a fresh machine: `make train` and `make test`. Both are idempotent:
# the virtual environment is (re)built only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: train test test-fast lint format clean-runs screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Headless Chromium for the screenshots and their test: Debian's package (Playwright drives it and never downloads a
# browser of its own). apt-get runs only when it is missing; as root, else through sudo.
CHROMIUM := /usr/bin/chromium
SUDO     := $(if $(filter 0,$(shell id -u)),,sudo)
$(CHROMIUM):
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core

train: $(VENV)/.runtime  ## train the default (LeNet-5 on the bundled digits); pass overrides as ARGS="..."
	$(BIN)/python -m pipeline.train $(ARGS)

test: $(VENV)/.dev $(CHROMIUM)  ## lint, then the whole test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(VENV)/.dev  ## lint, then every test that neither starts processes nor trains (the minutes-long loop)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not e2e and not slow" $(ARGS)

screenshots: $(VENV)/.dev $(CHROMIUM)  ## retake docs/images/*.png: a few short runs in a temporary store, shown by `mlflow server`
	$(BIN)/python -m docs.screenshots $(ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
