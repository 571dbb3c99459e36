# Two commands on a fresh machine: `make run` (the whole pipeline on the embedded default,
# offline, CPU, no root needed) and `make test`. Both build .venv/ first (`make setup`, idempotent:
# requirements.txt, the pinned lock); `make test` adds the test tools (requirements-test.txt) and the
# system packages the tests drive (chromium, postgresql; scripts/setup_system.sh), which needs root
# or sudo once.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
TEST_STAMP := $(VENV)/.setup-test-done
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
PROFILE ?= smoke
OUT ?= runs/$(PROFILE)

.PHONY: setup setup-test setup-system run test screenshots clean

setup: $(STAMP)
setup-test: $(TEST_STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $(TEST_STAMP)

# chromium and postgresql for the app's browser and PostgreSQL tests; a no-op once installed.
setup-system:
	bash scripts/setup_system.sh

run: setup
	$(BIN)/python -m phyassist run --config $(PROFILE) --output-dir $(OUT)

test: setup-test setup-system
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

# The README's pictures, on purpose: the app's screenshots (browser test) into images/app_*.png
# and the smoke run's training curves into images/finetune_<profile>_*.png. `make run` and
# `make test` never touch the tracked images/.
screenshots: setup-test setup-system
	PHYASSIST_SCREENSHOTS=images $(BIN)/python -m pytest -q tests/test_app_browser.py
	test -f $(OUT)/images/train_loss.png || $(MAKE) run
	cp $(OUT)/images/train_loss.png images/finetune_$(PROFILE)_loss.png
	cp $(OUT)/images/train_lr.png images/finetune_$(PROFILE)_lr.png

clean:
	rm -rf runs .pytest_cache
