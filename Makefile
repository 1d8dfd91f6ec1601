# Two commands for a newcomer: `make demo` (the whole study on the shipped data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= cpu
OUT ?= runs/$(PRESET)

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/cambackdoor run --preset $(PRESET) --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
