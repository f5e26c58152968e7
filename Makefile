# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv, installs what it needs from the project's own requirement files, and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.regrad-installed
SOURCES := $(shell find src -type f) CMakeLists.txt pyproject.toml requirements/dev.txt

.PHONY: demo test bench wheel clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned first (the CPU build the package index serves) so nothing pulls a CUDA build.
$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/regrad demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/bench_kernels.py

wheel:
	$(PYTHON) -m pip wheel . --no-deps -w dist

clean:
	rm -rf build dist $(VENV) .pytest_cache
