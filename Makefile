# `make all` is what CI runs: set up .venv (from the lock), lint, test, then build the tiny config.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/autoglm-phone-tiny.yaml
STAMP  := $(VENV)/.installed

.PHONY: all setup lint test test-fullwidth run bench-cpu bench-serve clean

all: setup lint test run

setup: $(STAMP)

# requirements.lock is pip-compile's output (requirements.in): every package, transitive ones too, pinned
# with its hashes, so setup installs exactly it with no resolver step (--no-deps, --require-hashes) and
# `pip check` proves the set complete. torch is the CPU build's local wheel (pip's find-links, /opt/wheels
# on this machine kind): an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check autoglm_build tests benchmarks scripts

test: setup
	$(BIN)/python -m pytest -q

# Exports the 9B model's real widths with 2 layers per tower (~20 GiB RAM, several minutes).
test-fullwidth: setup
	$(BIN)/python -m pytest -q -m fullwidth -s

run: setup
	$(BIN)/autoglm-build run -c $(CONFIG)

# CPU benchmarks: the pipeline cold vs cached, then ONNX Runtime decode vs transformers' generate.
bench-cpu: run
	$(BIN)/python benchmarks/pipeline_cpu.py -c $(CONFIG)
	$(BIN)/python benchmarks/decode_cpu.py -c $(CONFIG)

# 64 concurrent streaming clients on loopback, batched vs one request at a time.
bench-serve: run
	$(BIN)/python benchmarks/serve_load.py -c $(CONFIG)

clean:
	rm -rf build .pytest_cache
