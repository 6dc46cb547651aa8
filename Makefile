# One command sets everything up and runs the main job (`make demo`),
# one sets up and runs the tests (`make test`). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch pinned to the CPU wheel on this machine; the package itself accepts a range
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test,bench]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m mypy
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m kronfisher.cli demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m mypy

clean:
	rm -rf $(VENV)
