# The two commands of the README's quick start:
#   make demo   -- run the demonstration
#   make test   -- lint, type-check and run the whole test suite
# Each creates .venv and installs what it needs.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ctxrelay-installed
EXTRAS := dev,fastapi,flask,django,celery,rq,dramatiq,requests,httpx,aiohttp,structlog,loguru

.PHONY: demo test lint typecheck pytest services bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ctxrelay.demo

test: $(STAMP) lint typecheck services pytest

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

services:
	@bash scripts/ensure-services

pytest: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .hypothesis
