# The two set-up commands from the README: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The picker's per-request modules, compiled with mypyc (setup.py lists them): after an edit to one, the
# old compiled module would still be the one imported, so `make` compiles again.
BUILT    := $(VENV)/.compiled
COMPILED := $(shell sed -n 's/^    "\(extproc\/.*\.py\)",$$/\1/p' setup.py)
CONFIG ?= deploy/local/fleet.yaml

.PHONY: run test lint install envoy-config clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	EXTPROC_PURE_PYTHON=1 $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Compiled next to their sources (an editable install), in the build environment pip makes, as `pip install` does.
$(BUILT): $(STAMP) $(COMPILED)
	@echo "compiling the per-request modules with mypyc (about a minute)"
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(BUILT)

install: $(BUILT)

run: $(BUILT)
	$(BIN)/extproc up --config $(CONFIG)

test: $(BUILT)
	$(BIN)/ruff check extproc tests triton_models benchmarks setup.py
	$(BIN)/mypy
	sh tests/tools/ensure-prometheus.sh
	$(BIN)/pytest -q

lint: $(BUILT)
	$(BIN)/ruff check extproc tests triton_models benchmarks setup.py
	$(BIN)/ruff format --check extproc tests triton_models benchmarks setup.py
	$(BIN)/mypy

envoy-config: $(BUILT)
	$(BIN)/extproc envoy-config --config $(CONFIG) --output envoy/envoy.yaml

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache build
	find extproc -name '*.so' -delete
	rm -f *__mypyc.*.so
