# make install: .venv with torch 2.13.0 (CPU, first, so nothing pulls a CUDA build), then flexmoe.
# make run: the embedded default federated job (FLEx, tiny model, the packaged Dolly-15k).
# make test: lint and the whole test suite (what CI runs).
# make test-fast: lint and the tests not marked slow (no Ray, TLS deployment or signalled runs).
# make flwr-run: the app under `flwr run .` on Flower's local simulation, in this .venv (Flower
#   would otherwise install a runtime environment of its own); FLWR_ARGS adds to the command.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run flwr-run test test-fast lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

run: install
	$(VENV)/bin/flexmoe run

flwr-run: install
	FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PATH="$(abspath $(VENV))/bin:$$PATH" \
		$(VENV)/bin/flwr run . --stream $(FLWR_ARGS)

lint: install
	$(PY) -m ruff check src tests scripts benchmarks
	$(PY) -m ruff format --check src tests scripts benchmarks
	$(VENV)/bin/lint-imports

format: install
	$(PY) -m ruff check --fix src tests scripts benchmarks
	$(PY) -m ruff format src tests scripts benchmarks

test: install lint
	$(PY) -m pytest

test-fast: install lint
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
