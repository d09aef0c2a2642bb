# dicom-assets: two commands on a fresh machine.
#   make demo   set up, build the demo dataset, start the Dagster UI + daemon
#   make test   set up, lint (ruff: pyflakes, syntax, import order, complexity) and run the whole test suite
#   make check  everyday work: lint and the fast tier (every test not marked slow), a few minutes
#   make demo-cluster  the demo on the cluster profile: Redis, PostgreSQL, two Celery workers on loopback
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= $(CURDIR)/.venv
HOST ?= 127.0.0.1
PORT ?= 3000
DEMO_ROOT ?= $(CURDIR)/.demo/dataset
DAGSTER_YAML ?= dagster.yaml
CLUSTER_DEMO_ROOT ?= $(CURDIR)/.demo-cluster/dataset
CLUSTER_DAGSTER_HOME ?= $(CURDIR)/.demo-cluster/dagster_home
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export DICOM_ASSETS_CACHE ?= $(CURDIR)/.cache
export PATH := $(VENV)/bin:$(PATH)

.PHONY: demo demo-cluster test check lint setup samples bench bench-celery bench-deid clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dicom-assets needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	@touch $@

setup: $(VENV)/.installed
	@scripts/system-deps.sh

samples: setup
	$(VENV)/bin/dicom-assets fetch-samples

demo: samples
	VENV=$(VENV) DEMO_ROOT=$(DEMO_ROOT) HOST=$(HOST) PORT=$(PORT) DAGSTER_YAML=$(DAGSTER_YAML) scripts/demo.sh

# the demo with every step on two Celery workers (Redis, PostgreSQL on loopback): docs/deploy.md
demo-cluster: samples
	VENV=$(VENV) DEMO_ROOT=$(CLUSTER_DEMO_ROOT) HOST=$(HOST) PORT=$(PORT) DAGSTER_HOME=$(CLUSTER_DAGSTER_HOME) scripts/demo-cluster.sh

# ruff (pyproject.toml [tool.ruff]): pyflakes, syntax errors, import order and complexity, before any test runs
lint: setup
	$(VENV)/bin/ruff check dicom_assets dicom_assets_tests bench scripts

test: lint samples
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# the fast tier: every test without @pytest.mark.slow (a real chain of many visits, a browser,
# PostgreSQL, XNAT retries and timeouts are left to `make test`)
check: lint samples
	$(VENV)/bin/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

bench: samples
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

# the cluster profile against one machine (issue 28): bench/celery.py
bench-celery: samples
	$(VENV)/bin/python bench/celery.py $(BENCH_ARGS)

# de-identification against pydicom/deid, dicognito and Orthanc (issue 29): bench/deid.py; the two
# PyPI tools come from the optional extra `bench` (pyproject.toml), never the main dependencies
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/python -m pip install --quiet -e '.[test,bench]'
	@touch $@

bench-deid: samples $(VENV)/.bench-installed
	$(VENV)/bin/python bench/deid.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .demo .demo-cluster $(DAGSTER_HOME) .pytest_cache
