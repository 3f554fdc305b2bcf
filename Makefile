# `make run` and `make test` bootstrap their own virtualenv in .venv/ from nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean docs docs-check wheel-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[mnist]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.run-installed $(VENV)/.docs-installed

run: $(VENV)/.run-installed
	$(BIN)/jaxl2 train

$(VENV)/.docs-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $@

test: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n auto --maxprocesses 4

# The documentation site, offline and strict (a warning or a broken link fails), into site/.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The site in headless Chromium: title and navigation, every public name, search, figures.
docs-check: docs
	$(BIN)/python docs/check_site.py site

# The wheel and the sdist build, pass twine check, and the wheel alone runs the library's examples.
wheel-check: $(VENV)/.test-installed
	$(BIN)/python -m pytest -p no:cacheprovider -m wheel tests/test_wheel.py

clean:
	rm -rf $(VENV) runs site dist .pytest_cache .ruff_cache .mypy_cache
