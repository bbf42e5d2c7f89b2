# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ppray-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ppray demo

# Two workers, a test module at a time each (its module-scoped fixtures made once);
# `make test PYTEST_WORKERS=0` runs everything in one process.
PYTEST_WORKERS ?= 2

# Every Ray actor is a new Python process: without cached bytecode each one compiles
# ppray's sources again (~0.2 s of CPU each, a few hundred processes per suite).
unexport PYTHONDONTWRITEBYTECODE

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope

lint: $(STAMP)
	$(BIN)/ruff check ppray actors tests benchmarks scripts
	$(BIN)/mypy ppray actors
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_visit.py

clean:
	rm -rf ppray-output build dist *.egg-info
