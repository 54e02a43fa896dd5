# Two commands: `make train` and `make test` (lint + every test tier; CI runs it). Both create .venv on first use.
# `make test-fast`: the inner loop, without the slow, multiprocess and gpu tiers (tests/conftest.py).
VENV ?= .venv
PY := $(VENV)/bin/python
# one pytest worker per core, each test module on one worker (its module fixtures built once);
# `make test PYTEST_WORKERS=` runs them in one process
PYTEST_WORKERS ?= -n auto --dist loadscope

.PHONY: train test test-fast venv clean-venv

$(VENV)/.installed: pyproject.toml tools/setup_env.sh
	bash tools/setup_env.sh $(VENV)

venv: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/lightning-mtr fit --config conf/debug.yaml

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_WORKERS) tests

test-fast: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_WORKERS) tests -m "not slow and not multiprocess and not gpu"

clean-venv:
	rm -rf $(VENV)
