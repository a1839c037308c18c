# The two commands of the README's quick start:
#   make demo   -- run the demonstration
#   make test   -- lint, type-check, build the docs and run the whole test suite
# make demo creates .venv-demo (the demo extra only), make test .venv (everything).  Also:
#   make docs         -- the documentation site, into site/ (strict: broken links fail)
#   make dist         -- sdist + wheel into dist/, checked and installed in fresh venvs
#   make test-matrix  -- every CPython found, each extra at its oldest and newest version
#   make bench        -- the benchmarks

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ctxrelay-installed
EXTRAS := dev,docs,demo,fastapi,flask,django,celery,rq,dramatiq,requests,httpx,aiohttp,structlog,loguru,grpc,nats,taskiq,reactivex,sentry,opentelemetry

.PHONY: demo test lint typecheck docs pytest services bench dist test-matrix clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# arq pins redis<6, Celery needs >=6.4: arq works with the newer one.
	$(PY) -m pip install --quiet --no-deps "arq>=0.28"
	touch $(STAMP)

# The demo has a venv of its own with only the demo extra (FastAPI, uvicorn,
# httpx, Celery), not the ~100 packages the tests need.
DEMO_VENV  := .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.ctxrelay-installed
$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DEMO_VENV)/bin/python -m pip install --quiet -e ".[demo]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(DEMO_VENV)/bin/python -m ctxrelay.demo

test: $(STAMP) lint typecheck docs services pytest

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/ruff check src tests bench scripts

# mypy --strict on the code; then pyright --verifytypes on the installed package's
# public face (scripts/verify_types.py says why it is a script; ~5-10 s).
typecheck: $(STAMP)
	$(VENV)/bin/mypy
	$(PY) scripts/verify_types.py

services:
	@bash scripts/ensure-services

# The documentation site, built strictly: a broken link or anchor, a page
# missing from the nav or an unresolved API reference fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

pytest: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/run.py

# SDIST_TESTS: pytest arguments for the tests run from the unpacked sdist
# ("" for all of them, "skip" to skip them).
SDIST_TESTS ?= -m 'not broker'
dist: $(STAMP)
	$(PY) scripts/check_dist.py --sdist-tests "$(SDIST_TESTS)"

# Every CPython found and each extra at its oldest allowed version (and the
# newest, on the newest Python); results in build/matrix/results.md.  Long:
# not part of `make test`.  Name sessions to run only those:
#   make test-matrix SESSIONS="py3.12 oldest-rq"
SESSIONS ?=
test-matrix: $(STAMP) services
	$(PY) scripts/test_matrix.py $(SESSIONS)

clean:
	rm -rf $(VENV) $(DEMO_VENV) build dist site src/*.egg-info .mypy_cache .ruff_cache .hypothesis
