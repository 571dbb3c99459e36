# Two commands on a fresh machine: `make run` (the whole pipeline on the embedded default,
# offline, CPU) and `make test`. Both build .venv/ first (`make setup`, idempotent).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
PROFILE ?= smoke
OUT ?= runs/$(PROFILE)

.PHONY: setup run test clean bench-cpu

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml scripts/setup_system.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	bash scripts/setup_system.sh
	touch $(STAMP)

run: setup
	$(BIN)/python -m phyassist run --config $(PROFILE) --output-dir $(OUT)

test: setup
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
