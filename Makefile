# Shortcuts; the scripts are the source of truth (README's two commands, CI).
PY ?= python3
VENV ?= .venv

.PHONY: demo test soak lint clean

demo:
	[ -x $(VENV)/bin/python ] || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e .
	$(VENV)/bin/inturn demo

test:
	bash scripts/test

soak:
	bash scripts/test -m slow

lint:
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
