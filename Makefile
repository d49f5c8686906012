# The two entry points of the README: `make bench` (the main job) and `make test`.
# Both create .venv if missing, install pinned dependencies once (stamp file), build the C++
# extension incrementally, then run. Pins: torch 2.13.0 (CPU wheel here) pins triton 3.7.1.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.deps-installed
DEPS   := torch==2.13.0 triton==3.7.1 numpy pytest ninja setuptools wheel \
          "transformers>=4.40" tqdm av decord matplotlib pytest-benchmark
SOURCES := $(shell find csrc -type f) setup.py
EXT_STAMP := $(VENV)/.ext-built

.PHONY: install test test-all bench bench-full bench-report clean info gpu

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(DEPS)
	touch $@

$(EXT_STAMP): $(STAMP) $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(EXT_STAMP)

test: install
	$(PY) -m pytest -q tests

# Everything, including slow sweeps.
test-all: install
	TVR_RUNSLOW=1 $(PY) -m pytest -q tests

# The main job: every op and model stage at the papers' shapes (< 10 min on 2 CPU cores); the
# minutes-long 1000 x 1000 eager references are taken from the records (bench-full reruns them).
bench: install
	$(PY) -m benchmarks

bench-full: install
	$(PY) -m benchmarks --shapes large

# README table and charts from benchmarks/results/results.csv.
bench-report: install
	$(PY) -m benchmarks.report --write
	$(PY) -m benchmarks.plot

info: install
	$(PY) -m tvr_kernels.info

# The GPU machine's run (build with CUDA, tests, benchmarks on cuda; see benchmarks/gpu.sh):
# its own $(PYTHON), no .venv, nothing installed from the network. GPU_ARGS="--skip-tests" etc.
gpu:
	bash benchmarks/gpu.sh --python $(PYTHON) $(GPU_ARGS)

clean:
	rm -rf build *.egg-info tvr_kernels/*.so $(EXT_STAMP)
