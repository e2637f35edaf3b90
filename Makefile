# Quick start: `make bench` (the main job) and `make test`. Both set everything up first:
# a virtual environment in .venv, torch, the tools, and the package with its C++ CPU and
# CUDA C++ extensions (the CUDA one compiles without a GPU when nvcc is present).
#
# Knobs: PYTHON (interpreter for the venv), TORCH_SPEC (torch to install when the venv cannot
# already import one), CUDA_HOME, MAX_JOBS, BENCH_ARGS (e.g. BENCH_ARGS="--full"),
# PYTEST_ARGS.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
PYTEST_ARGS ?=
BENCH_ARGS ?=
export MAX_JOBS
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.package-built
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.inc csrc/*/*.cu csrc/*/*.cuh csrc/*/*.py csrc/*/*/*.h csrc/*/*/*.cpp)

.PHONY: setup test test-quick bench env clean gpu-check

setup: $(BUILD_STAMP)

# --system-site-packages: on a machine that already has torch (a GPU box), reuse it.
$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	-$(PY) -m pip install -q --upgrade pip  # optional: an offline GPU box keeps its pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(BUILD_INPUTS)
	@echo "building neuronml_fast and its extensions (a few minutes on 2 cores)"
	time $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

env: setup
	$(PY) -m neuronml_fast

# The emulated CUDA kernels run in the main pass in random warp order, then again in forward and
# reverse order (a missing barrier fails in at least one of them).
# bench/tests: the benchmark's own tools (report, gpu-check, Triton AOT, its cases); bench/test_bench.py
# is pytest-benchmark's timing run (pytest bench/test_bench.py --benchmark-only), not a test.
test: setup
	$(PY) -m neuronml_fast
	$(PY) -m pytest tests bench/tests $(PYTEST_ARGS)
	for order in forward reverse; do \
	  NEURONML_FAST_CUDA_EMULATE_ORDER=$$order $(PY) -m pytest tests -q -k "cuda and not emulation" $(PYTEST_ARGS) || exit 1; \
	done

# The quick run: everything but the emulated GPU backends (CI runs `make test`).
test-quick: setup
	$(PY) -m pytest tests bench/tests -m "not emulated" $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

# On a GPU box with torch, triton and nvcc preinstalled (no venv, no network): build (editable),
# run the GPU tests, the self-check, compute-sanitizer and a short bench; logs under OUT.
gpu-check:
	$(PYTHON) -m bench.gpu_check $(if $(OUT),--out $(OUT))

clean:
	rm -rf build *.egg-info neuronml_fast/*.so $(BUILD_STAMP)
