# health-ingest: `make demo` runs the pipeline end to end on bundled data; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test test-integration test-browser test-faults test-deployment lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/health-ingest demo

# Debian's chromium, which the UI test drives through Playwright (no browser build is downloaded)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver)

test: install browser
	$(BIN)/pytest -m "not deployment and not faults" $(PYTEST_ARGS)

test-browser: install browser
	$(BIN)/pytest -m browser $(PYTEST_ARGS)

test-integration: install
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

test-faults: install
	$(BIN)/pytest -m faults $(PYTEST_ARGS)

# The real Airflow processes (api-server, scheduler, dag-processor, triggerer, two Celery workers) on the PostgreSQL
# of HEALTH_INGEST_TEST_DATABASE_URL (default 127.0.0.1:5432) and the Redis of 127.0.0.1:6379.
test-deployment: install
	$(BIN)/pytest -m deployment $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python -m health_ingest.bench $(if $(QUICK),--quick) --out $(or $(BENCH_OUT),bench-results.json)

clean:
	-$(BIN)/python -c "from health_ingest.warehouse.embedded import stop_embedded_warehouse as s; s()" 2>/dev/null
	rm -rf .state
