PYTHON ?= python3

.PHONY: setup test lint guest bench clean

setup:
	bash scripts/setup.sh

guest:
	$(MAKE) -C guest

lint:
	$(PYTHON) -m ruff check kvmlet tests $(wildcard bench)
	$(PYTHON) -m mypy

test: lint
	$(PYTHON) -m pytest -q

bench:
	$(PYTHON) -m bench

clean:
	$(MAKE) -C guest clean
