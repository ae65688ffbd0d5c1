# The two set-up commands from the README: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= deploy/local/fleet.yaml

.PHONY: run test lint install envoy-config clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/extproc up --config $(CONFIG)

test: $(STAMP)
	$(BIN)/ruff check extproc tests triton_models
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check extproc tests triton_models
	$(BIN)/ruff format --check extproc tests triton_models
	$(BIN)/mypy

envoy-config: $(STAMP)
	$(BIN)/extproc envoy-config --config $(CONFIG) --output envoy/envoy.yaml

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
