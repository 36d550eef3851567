# Every target creates or reuses .venv; re-running is cheap once it exists.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test demo lint complexity bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The test command CI runs (.ci/run).
test: setup
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
