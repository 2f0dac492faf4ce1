# dicom-gateway — `make run` to try it, `make test` to prove it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ./data
PYTEST_ARGS ?=

.PHONY: run test test-fast install install-test services lint bench clean

# Debian ships venv separately: install python3-venv when it is missing and we are root.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
	  $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'

run: install
	$(BIN)/dicom-gateway serve --data-dir $(DATA)

services:
	bash scripts/test-services.sh

test: install-test services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install-test
	$(BIN)/python -m pytest -m fast $(PYTEST_ARGS)

lint: install-test
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	$(BIN)/pre-commit run --all-files --show-diff-on-failure

bench: install-test services
	$(BIN)/python benchmarks/ingest.py --orthanc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
