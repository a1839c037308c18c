# The two commands of the README's quick start:
#   make demo   -- run the demonstration
#   make test   -- lint, type-check, build the docs and run the whole test suite
# Each creates .venv and installs what it needs.  Also:
#   make docs         -- the documentation site, into site/ (strict: broken links fail)
#   make dist         -- sdist + wheel into dist/, checked and installed in fresh venvs
#   make test-matrix  -- every CPython found, each extra at its oldest and newest version
#   make bench        -- the benchmarks

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ctxrelay-installed
EXTRAS := dev,docs,demo,fastapi,flask,django,celery,rq,dramatiq,requests,httpx,aiohttp,structlog,loguru

.PHONY: demo test lint typecheck pytest services bench dist clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ctxrelay.demo

test: $(STAMP) lint typecheck services pytest

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/ruff check src tests bench scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy

services:
	@bash scripts/ensure-services

pytest: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/run.py

# SDIST_TESTS: pytest arguments for the tests run from the unpacked sdist
# ("" for all of them, "skip" to skip them).
SDIST_TESTS ?= -m 'not broker'
dist: $(STAMP)
	$(PY) scripts/check_dist.py --sdist-tests "$(SDIST_TESTS)"

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .mypy_cache .ruff_cache .hypothesis
