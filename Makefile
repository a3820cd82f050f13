# Targets create .venv on first use; stamps skip pip when the packaging is unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PACKAGING := setup.cfg pyproject.toml

.PHONY: demo test

demo: $(VENV)/.stamp-demo
	$(PY) -m bhvit_jax.train --config configs/demo.py --workdir runs/demo

test: $(VENV)/.stamp-test
	BHVIT_TORCH_REPO=$${BHVIT_TORCH_REPO:-skip} \
	  $(PY) -m pytest -q -n 2 --dist loadgroup -rs --durations=15 tests

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-demo: $(PACKAGING) | $(PY)
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.stamp-test: $(PACKAGING) | $(PY)
	$(PY) -m pip install -e ".[test]"
	touch $@
