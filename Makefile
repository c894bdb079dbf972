# One-command set-up: `make demo` and `make test` create or refresh .venv,
# install everything at the locked versions, then act. Every target is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet
# Every package at the version the suite last passed with: requirements.lock pins them all (pip
# constraints), pyproject.toml only states what distgen needs. Refresh it with `make lock` after
# upgrading .venv and seeing `make test` pass.
LOCK := requirements.lock
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?= --durations=20
# Two workers on 2 cores: much of a test is a subprocess starting or waiting for its peer. A test file stays on one
# worker (its module-scoped runs made once); session-wide runs are made once (tests/conftest.py made_once).
XDIST := -n 2 --dist loadfile
DS_BUILD := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu)

.PHONY: setup sysdeps demo test test-fast lock clean

setup: $(VENV)/.installed

# Re-run the install whenever the dependency list, the lock or this file changes.
$(VENV)/.installed: pyproject.toml $(LOCK) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c $(LOCK) setuptools wheel
	# PyPI's default torch build: PyPI's torchvision (needed by torch-fidelity) only loads next to it,
	# and it runs on CPU.
	$(PIP) install -c $(LOCK) torch torchvision
	# DeepSpeed's sdist imports torch while it builds: no build isolation. Without a GPU, its CPU accelerator's
	# shared-memory all-reduce op is built here, once, not by every fresh run's first DeepSpeed engine (a minute of
	# JIT compiling, redone whenever the venv's path changes); no wheel cache, which may hold a build without it.
	$(DS_BUILD) $(PIP) install -c $(LOCK) --no-build-isolation --no-cache-dir deepspeed
	# the tests train with every tracker (W&B offline, MLflow's file store): the trackers extra too
	$(PIP) install -c $(LOCK) -e '.[test,trackers]'
	$(PY) -c "import torch, torchvision, deepspeed, accelerate, diffusers, webdataset, torch_fidelity, submitit, transformers, torchdiffeq, onnx, onnxscript, onnxruntime, wandb, mlflow"
	touch $@

# Pin what .venv holds now (run after `make test` passed on an upgraded .venv).
lock:
	test -x $(PY) || { echo "error: no $(VENV); run make setup (or make test) first" >&2; exit 1; }
	{ echo "# pip constraints: the versions distgen's suite last passed with (make lock writes this file)."; \
	  $(PY) -m pip freeze --all --exclude-editable --exclude pip; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

# Debian's Fashion-MNIST: the bundled default data set of the demo and tests; strace for one test.
sysdeps:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "error: $(FMNIST) missing; run: sudo apt-get install dataset-fashion-mnist" >&2; exit 1; fi; \
	fi
	@# strace: tests/test_async_checkpoint.py holds the run's fsync calls back with it (a slow disk)
	@if ! command -v strace >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace; \
	  else echo "warning: strace missing (sudo apt-get install strace): one test of make test skips without it" >&2; fi; \
	fi

demo: setup sysdeps
	$(VENV)/bin/distgen demo

# The full suite (what .ci/run calls).
test: setup sysdeps
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The edit-test loop: the in-process checks, without the tests that launch processes or train (marker e2e).
test-fast: setup sysdeps
	$(PY) -m pytest $(XDIST) -m "not e2e" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs data/shards .pytest_cache
