# The two set-up commands from the README: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The picker's per-request modules, extproc/datapath, compiled with mypyc (setup.py): after an edit to one, the
# old compiled module would still be the one imported, so `make` compiles again.
BUILT    := $(VENV)/.compiled
COMPILED := $(shell find extproc/datapath -name '*.py')
CONFIG ?= deploy/local/fleet.yaml
# Test modules run at once (pytest-xdist), each whole in one process so that its stack starts once; most
# of a module's time is spent waiting on its servers (docs/development.md).
TEST_WORKERS ?= 3

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
	$(BIN)/ruff format --check extproc tests triton_models benchmarks setup.py
	$(BIN)/mypy
	sh tests/tools/ensure-prometheus.sh
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

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

# `make bench`: lists the benchmarks (benchmarks/, outside the shipped package), then runs the quick one: the
# picker's in-process decision time over synthetic fleets (BENCH_ARGS passes it options, e.g. --iterations 2000).
.PHONY: bench
bench: $(BUILT)
	@echo "benchmarks, each run from the repository root (--help lists its options; results in benchmarks/results/):"
	@echo "  $(BIN)/python -m benchmarks.decision           decision time over synthetic fleets (runs now)"
	@echo "  $(BIN)/python -m benchmarks.instructions       instructions per request (needs valgrind)"
	@echo "  $(BIN)/python -m benchmarks.overhead           picker vs plain Envoy and a bare processor (wrk optional)"
	@echo "  $(BIN)/python -m benchmarks.routing -s NAME    picker vs Envoy's balancers, benchmarks/scenarios/NAME.yaml"
	@echo "  $(BIN)/python -m benchmarks.capacity -s NAME   each policy's capacity at a p99 SLO (--slo-ms), same scenarios"
	@echo "  $(BIN)/python -m benchmarks.plot FILE.json     a latency-CDF PNG from series of latencies"
	@echo "  $(BIN)/python -m benchmarks.compare_revisions  the overhead benchmark of two worktrees, alternately"
	@echo "  $(BIN)/python -m benchmarks.sim --all          the fleet simulator's scenario family"
	@echo "  $(BIN)/python -m benchmarks.fleet --hosts N    telemetry cost over N emulated Triton hosts"
	@echo "  $(BIN)/python -m benchmarks.placement          placement controller off vs on: demand shift (--steady S)"
	$(BIN)/python -m benchmarks.decision $(BENCH_ARGS)
