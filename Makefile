# The two commands of the README: `make demo` (train + eval the tiny default) and `make test`.
# Both create .venv on first use; re-running is fast when the requirement files did not change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip --disable-pip-version-check -q install --no-compile
# pip byte-compiles what it installs on one core (40 of the 70 s that requirements.txt takes on 2 cores);
# compileall does it on every core. Its exit status is ignored: torch ships a Python 3.12-only test file,
# which pip's own compile step skips as well.
COMPILE := $(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
NPROC ?= 4
PYTEST_ARGS ?=

.PHONY: demo test venv test-venv lint gpu-check gpu-wheels clean

# clip-benchmark (ImageNet-1k names and templates for the eval launchers) goes in without its declared
# dependencies: they pull torchvision, which would replace the CPU torch build.
$(VENV)/.stamp-base: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt
	$(PIP_INSTALL) --no-deps clip-benchmark==1.6.2
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	$(COMPILE)
	touch $@

# torchscale (the reference architecture) and open-clip-torch (the reference loss) go in without their
# declared dependencies: those pull torchvision / timm, which would replace the CPU torch build.
$(VENV)/.stamp-test: $(VENV)/.stamp-base requirements-test.txt
	$(PIP_INSTALL) -r requirements-test.txt
	$(PIP_INSTALL) --no-deps torchscale==0.3.0 open-clip-torch==3.3.0
	$(COMPILE)
	touch $@

venv: $(VENV)/.stamp-base
test-venv: $(VENV)/.stamp-test

demo: venv
	$(PY) -m m2megatron.demo --nproc $(NPROC)

# Two pytest-xdist workers: most tests leave a core idle (imports, gloo waits, Slurm jobs). Each file (and
# the Slurm tier as a whole) stays on one worker; tests/conftest.py starts the longest groups first.
TEST_WORKERS ?= 2
test: test-venv
	$(PY) -m compileall -q -j 0 m2megatron kernels tests tools > /dev/null  # for every fresh interpreter of the run
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --no-loadscope-reorder $(PYTEST_ARGS)

lint: test-venv
	$(VENV)/bin/ruff check .

# Offline: no venv, no pip from the network. run.sh uses a CUDA .venv if there is one, else python3, installs the
# carried .whl/ (from `make gpu-wheels`) into a temporary folder, and stops with one line if CUDA or Megatron-Core
# is missing. OUT=dir keeps summary.txt, env.txt and the five stage logs.
gpu-check:
	bash tests/gpu/run.sh

# The wheels a bare GPU host (Python 3.12, CUDA torch, no network) needs for tests/gpu/run.sh, into .whl/
# (git-ignored; carried to the host beside the repository). TE and DALI are too large: NGC hosts only.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl megatron-core==0.16.1

clean:
	rm -rf runs .pytest_cache
