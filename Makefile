# Every target creates or reuses .venv; re-running is cheap once it exists.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup lock browser test demo lint complexity bench clean

# The dependencies come from requirements.lock (every package pinned, with its SHA-256), then the
# package itself without dependencies, built with the locked setuptools (no unpinned download).
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# Regenerates requirements.lock from pyproject.toml's pins (base + dev extras, CPython 3.11,
# Linux x86-64): transitive versions already in the lock are kept where still allowed;
# `make lock UPGRADE=--upgrade` takes the newest allowed ones. Then `make setup` installs it.
UV := uv==0.13.9
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(UV)
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --no-annotate \
	  --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	  --custom-compile-command 'make lock' $(UPGRADE) -o requirements.lock

# Headless Chromium for the page tests (tests/test_report.py load report.html in it): Debian's
# package, installed with apt (root, or sudo); nothing when a chromium is already on PATH.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

# The test command CI runs (.ci/run); the page tests need the browser.
test: setup browser
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

# The main job on the built-in demo data: trains, checkpoints, evaluates, prints the metrics.
demo: setup
	$(BIN)/python -m launch.train --config=configs/cutpaste_wdam.py:demo --workdir=workdirs/cutpaste_wdam_demo

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

complexity: setup
	$(BIN)/python -m launch.complexity

bench: setup
	$(BIN)/pip install -q -e '.[dev,bench]'
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf workdirs .pytest_cache
