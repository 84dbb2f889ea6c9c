VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast lint format demo bench clean

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q -e ".[dev]" -e galore-torch
	$(PY) -m pip check

test: $(PY)
	$(PY) -m pytest -q

test-fast: $(PY)
	$(PY) -m pytest -q -m "not slow"

lint: $(PY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(PY)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: $(PY)
	$(PY) scripts/demo.py

bench: $(PY)
	$(PY) scripts/bench/optimizer_step.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache outputs
