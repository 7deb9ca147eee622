# Two entry points for a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
DATA_DIR ?= .meterline

.PHONY: up cluster test test-fast lint typecheck unit docs screenshots bench clean system-tools

# uv installs in seconds what pip takes minutes over; pip stays the fallback (a machine whose
# index or proxy only pip is configured for).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv

# Compiled at install, the libraries (pip does by default, uv when asked) and meterline's own
# packages: where PYTHONDONTWRITEBYTECODE is set, every start of meterline would compile them
# from source again (the core's app: 1.3 s of CPU to import, 0.67 s compiled).
INSTALL = ($(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e $(1) \
	|| $(BIN)/pip install --quiet -e $(1)) && $(BIN)/python -m compileall -q ingest aggregator meters

# Stamp files so the install reruns only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(call INSTALL,.)
	touch $@

# The test extra holds the cluster's (the broker).
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(call INSTALL,'.[test]')
	touch $(VENV)/.installed $(VENV)/.installed-cluster $@

$(VENV)/.installed-cluster: pyproject.toml | $(BIN)/python
	$(call INSTALL,'.[cluster]')
	touch $(VENV)/.installed $@

# Polar's own ingestion strategies under Node, for the SDK's compatibility test.
NODE_PROJECT := tests/ingest/sdk/polar_ingestion
$(NODE_PROJECT)/node_modules/.installed: $(NODE_PROJECT)/package.json $(NODE_PROJECT)/package-lock.json
	command -v npm >/dev/null || (apt-get update -q && apt-get install -y -q nodejs npm)
	cd $(NODE_PROJECT) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

up: $(VENV)/.installed
	$(BIN)/meterline up --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

# Kafka mode on this machine until Ctrl-C: a broker, a leader, a standby, a replica and an edge
# (`meterline cluster --help`; CLUSTER="--port 8110 --kafka-port 9292" moves it).
cluster: $(VENV)/.installed-cluster
	$(BIN)/meterline cluster $(CLUSTER)

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# From apt, when missing: Debian's chromium for the console's browser tests (playwright drives
# it; no browser download), curl for the README's and the docs' commands (tests/test_readme.py, tests/test_docs.py), kcat for its
# producer example (tests/ingest/test_producer_examples.py), nginx to run deploy/nginx.conf
# (tests/deploy/test_nginx.py), systemd-analyze to verify deploy/meterline.service and promtool
# (Debian's prometheus) to check deploy/prometheus.
system-tools:
	command -v chromium >/dev/null && command -v curl >/dev/null && command -v kcat >/dev/null \
		&& command -v nginx >/dev/null && command -v systemd-analyze >/dev/null \
		&& command -v promtool >/dev/null \
		|| (apt-get update -q && apt-get install -y -q chromium curl kcat nginx systemd \
			&& apt-get install -y -q --no-install-recommends prometheus)

TEST_TOOLS := $(VENV)/.installed-test $(NODE_PROJECT)/node_modules/.installed system-tools

# Lint, types, the tests on four workers, then alone those that measure time, then a look at
# the checkout: every phase runs whatever the one before it said, and the last line sums them
# (tests/phases.py).
test: $(TEST_TOOLS)
	$(BIN)/python -m tests.phases

# The edit-run loop: the tests that start no process (no broker, server, CLI or browser: not
# marked `processes`) and measure no time, on four workers, as `make test` runs them.
test-fast: $(VENV)/.installed-test
	$(BIN)/python -m tests.phases --fast

unit: $(TEST_TOOLS)
	$(BIN)/pytest -n 4 --dist loadfile -m "not serial"
	$(BIN)/pytest -m serial

# The docs site (mkdocs.yml, docs/), rebuilt on every save; on port 8001, beside `make up` on
# 8000. `make test` builds it with --strict (tests/test_docs.py). NO_MKDOCS_2_WARNING: Material's
# banner about MkDocs 2.0, not a warning about the site.
docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

# The console's screenshots that the docs show, taken anew (the tests take them into a
# scratch folder otherwise).
screenshots: $(TEST_TOOLS)
	METERLINE_SCREENSHOTS=$(CURDIR)/docs/screenshots $(BIN)/pytest tests/aggregator/console

# Every benchmark, or `make bench BENCH="name ..."`; QUICK=1 for smoke runs (results kept apart,
# never replacing the committed ones). It says first about how long the run will take.
bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks.run $(BENCH) $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache $(NODE_PROJECT)/node_modules
