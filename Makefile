# Two commands do everything:
#   make serve         set up, then stream from the built-in demo model and open the page in a browser
#   make test          set up, then run the test suite (what CI runs, with check-wheel)
#   make test-fast     the same without the slow, browser and GPU tests: under a minute, for while you work
# and, for the day the pins move:
#   make test-latest   the suite against the newest release of every dependency, in a fresh .venv-latest
#   make lock          test-latest, then write the versions it passed with to constraints.txt (the lock)
#   make test-lowest   the suite against the lowest versions pyproject.toml allows, in a fresh .venv-lowest
#   make check-wheel   build the wheel, install it into a fresh venv outside the checkout and use it from there
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
LOCK    ?= constraints.txt
# The torch family is pinned here rather than in the lock, and installed only where missing: a GPU machine keeps
# the torch build (and the triton it brings) that it has. 2.13.0 is a CPU build where no CUDA is set up.
TORCH   ?= torch==2.13.0
TRITON  ?= triton==3.9.0
PIP      = $(BIN)/python -m pip install -q $(if $(LOCK),-c $(LOCK))
LATEST  := .venv-latest
LOWEST  := .venv-lowest

.PHONY: setup setup-test serve test test-fast test-latest lock test-lowest check-wheel

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: an unpinned requirement would pull the multi-GB CUDA build where no torch is installed.
setup: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) $(TORCH)
	$(PIP) -e .

setup-test: setup
	[ "$$(uname -s)" != Linux ] || $(BIN)/python -c "import triton" 2>/dev/null || $(PIP) $(TRITON)
	$(PIP) -e ".[test]"
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || echo "warning: chromium not installed; browser tests will be skipped"

# ARGS go to `longsana serve` as they are: make serve ARGS="--port 8001 --model PATH"
serve: setup
	$(BIN)/longsana serve --open $(ARGS)

test: setup-test
	$(BIN)/python -m pytest -q

# The markers are registered in pyproject.toml; `slow` is a test over about 2 s on a 2-core CPU.
test-fast: setup-test
	$(BIN)/python -m pytest -q -m "not slow and not browser and not gpu"

test-latest:
	rm -rf $(LATEST)
	$(MAKE) test VENV=$(LATEST) LOCK=

lock: test-latest
	{ echo "# The lock: the versions \`make test-latest\` passed with on $$(date -u +%F), $$(uname -sm)."; \
	  echo "# Python $$($(LATEST)/bin/python -V | cut -d' ' -f2). Regenerate: make lock. torch and triton: the Makefile's TORCH, TRITON."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|cuda-)'; } > $(LOCK)

# The lower bounds, checked: uv resolves every direct dependency to its lowest allowed version, torch and triton
# included (torch's oldest release comes from PyPI as a CUDA build, about 3 GB, which runs on a CPU too).
test-lowest:
	rm -rf $(LOWEST)
	$(PY) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q uv
	$(LOWEST)/bin/uv pip install -q --python $(LOWEST)/bin/python --resolution lowest-direct -e ".[test]"
	$(LOWEST)/bin/python -m pytest -q

check-wheel:
	PY=$(PY) TORCH=$(TORCH) LOCK=$(abspath $(LOCK)) bash .ci/check-wheel
