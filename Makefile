# One-command set-up: `make demo` and `make test` create or refresh .venv,
# install everything, then act. Every target is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet
# PyPI's default torch build: PyPI's torchvision (needed by torch-fidelity) only
# loads next to it, and it runs on CPU. Pinned as a matching pair.
TORCH ?= torch==2.14.1
TORCHVISION ?= torchvision==0.29.1
DEEPSPEED ?= deepspeed==0.19.8
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?= --durations=30

.PHONY: setup sysdeps demo test clean

setup: $(VENV)/.installed

# Re-run the install whenever the dependency list or this file changes.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH) $(TORCHVISION)
	# DeepSpeed's sdist imports torch while it builds: no build isolation.
	$(PIP) install --no-build-isolation $(DEEPSPEED)
	$(PIP) install -e '.[test]'
	$(PY) -c "import torch, torchvision, deepspeed, accelerate, diffusers, webdataset, torch_fidelity, submitit, transformers"
	touch $@

# Debian's Fashion-MNIST: the bundled default data set of the demo and tests.
sysdeps:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "error: $(FMNIST) missing; run: sudo apt-get install dataset-fashion-mnist" >&2; exit 1; fi; \
	fi

demo: setup sysdeps
	$(VENV)/bin/distgen demo

test: setup sysdeps
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs data/shards .pytest_cache
