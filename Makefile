# Two commands: `make train` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test venv clean-venv

$(VENV)/.installed: pyproject.toml tools/setup_env.sh
	bash tools/setup_env.sh $(VENV)

venv: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/lightning-mtr fit --config conf/debug.yaml

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
