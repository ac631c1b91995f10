# dsml developer tasks. Works on a fresh clone with only python3 (with venv and pip):
# every target creates or reuses .venv and installs the project into it first.
#
#   make test    ruff, then the test suite (PYTEST_ARGS="-k store -x" to narrow it)
#   make demo    a small local cluster, driven end to end
#   make bench   benchmarks, with redis-server as a reference (installed if root)
#   make test-faults  the multi-host fault scenarios (root, namespaces, nftables) x3
#   make lint    ruff only
#   make clean   caches, build output and the example cluster's data under var/

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := $(CURDIR)/.venv
# The stamp depends on pyproject.toml, so changed dependencies are installed on the next run.
STAMP := $(VENV)/.installed-stamp
# Tests spawn twistd and dsml: they must find the venv's scripts first.
export PATH := $(VENV)/bin:$(PATH)

LINT_PATHS := dsml tests twisted/plugins $(wildcard benchmarks)
PYTEST_ARGS ?=

.PHONY: test test-faults nft demo bench lint clean distclean venv

venv: $(STAMP)

# A venv created without ensurepip has a python but no pip: remove it and say why.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "cannot create .venv: install python3-venv (apt-get install python3-venv)" >&2; \
		exit 1; }

# editable_mode=compat: a plain editable install hides twisted/plugins from twistd.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-e '.[test]' --config-settings editable_mode=compat
	touch $@

# The benchmarks' references (redis-py, Dask) only for make bench: tests never need them.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-e '.[test,bench]' --config-settings editable_mode=compat
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)

# The multi-host fault tests need nftables: installed here when we are root and it is
# not; never an error (those tests skip, saying why, without it).
nft:
	@command -v nft >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 \
		|| DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 \
		     && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables >/dev/null 2>&1; } \
		|| true
	@command -v nft >/dev/null 2>&1 || echo "no nftables: the multi-host fault tests will skip" >&2

test: lint nft
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Every multi-host fault scenario, RUNS times each (default 3), and the nemesis for 10 min.
test-faults: $(STAMP) nft
	DSML_FAULT_SCENARIOS=all DSML_FAULT_RUNS=$${RUNS:-3} DSML_NEMESIS_BUDGET=600 \
		$(VENV)/bin/python -m pytest -q -s tests/test_faults_hosts.py tests/test_nemesis.py

demo: $(STAMP)
	$(VENV)/bin/python -m dsml.demo

bench: $(BENCH_STAMP)
	@if ! command -v redis-server >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "redis-server not found: installing Debian's redis-server"; \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; \
		else \
			echo "redis-server not found; for the redis reference figures run:" >&2; \
			echo "    sudo apt-get update && sudo apt-get install -y redis-server" >&2; \
		fi; \
	fi
	$(VENV)/bin/python benchmarks/run.py
	$(VENV)/bin/python benchmarks/cluster.py
	$(VENV)/bin/python benchmarks/jobs.py
	$(VENV)/bin/python benchmarks/staging.py
	$(VENV)/bin/python benchmarks/functions.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis .ruff_cache var
	rm -f twisted/plugins/dropin.cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also remove the virtual environment.
distclean: clean
	rm -rf $(VENV)
