# fgembed — `make demo` runs the embedded example, `make test` the test suite.
# Both create a local virtual environment (.venv) and install everything into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fgembed-installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/fgembed demo

bench: install
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf demo-output .pytest_cache
