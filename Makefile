# `make all` is what CI runs: set up .venv (pinned), lint, test, then build the tiny config.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/autoglm-phone-tiny.yaml
STAMP  := $(VENV)/.installed

.PHONY: all setup lint test test-fullwidth run bench-cpu bench-serve clean

all: setup lint test run

setup: $(STAMP)

# torch==2.13.0 is pinned in requirements.lock: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
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
