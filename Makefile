# Two commands do everything:
#   make serve   set up, then stream from the built-in default model and open the page in a browser
#   make test    set up, then run the test suite (what CI runs)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0

.PHONY: setup setup-test serve test

# torch first, pinned: an unpinned requirement would pull the multi-GB CUDA build where no torch is installed.
$(BIN)/python:
	$(PY) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .

setup-test: setup
	$(BIN)/pip install -q -e ".[test]"
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || echo "warning: chromium not installed; browser tests will be skipped"

serve: setup
	$(BIN)/longsana serve --open

test: setup-test
	$(BIN)/python -m pytest -q
