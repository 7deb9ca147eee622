# Two entry points for a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
DATA_DIR ?= .meterline

.PHONY: up test lint typecheck unit bench clean system-tools

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamp files so the install reruns only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

# Polar's own ingestion strategies under Node, for the SDK's compatibility test.
NODE_PROJECT := tests/ingest/sdk/polar_ingestion
$(NODE_PROJECT)/node_modules/.installed: $(NODE_PROJECT)/package.json $(NODE_PROJECT)/package-lock.json
	command -v npm >/dev/null || (apt-get update -q && apt-get install -y -q nodejs npm)
	cd $(NODE_PROJECT) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

up: $(VENV)/.installed
	$(BIN)/meterline up --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# From apt, when missing: Debian's chromium for the console's browser tests (playwright drives
# it; no browser download), curl for the README's commands (tests/test_readme.py) and kcat for its
# producer example (tests/ingest/test_producer_examples.py).
system-tools:
	command -v chromium >/dev/null && command -v curl >/dev/null && command -v kcat >/dev/null \
		|| (apt-get update -q && apt-get install -y -q chromium curl kcat)

unit: $(VENV)/.installed-test $(NODE_PROJECT)/node_modules/.installed system-tools
	# Three workers (most tests wait on real processes); then, alone, those that measure time.
	$(BIN)/pytest -n 3 --dist loadfile -m "not serial"
	$(BIN)/pytest -m serial

test: lint typecheck unit

# Every benchmark, or `make bench BENCH="name ..."`; QUICK=1 for smoke runs (results kept apart,
# never replacing the committed ones). It says first about how long the run will take.
bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks.run $(BENCH) $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache $(NODE_PROJECT)/node_modules
