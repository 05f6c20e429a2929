# Two entry points: `make demo` and `make test`. Each sets up .venv on first use.
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test lint unit e2e bench clean

setup:
	@./scripts/bootstrap.sh

demo: setup
	$(PY) examples/demo.py

lint: setup
	$(PY) -m ruff check pillion tests bench examples
	$(PY) -m ruff format --check pillion tests bench examples
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

unit: setup
	$(PY) -m pytest -q tests/unit tests/conformance

e2e: setup
	$(PY) -m pytest -q tests/e2e

bench: setup
	$(PY) bench/invoke.py

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
