# Two entry points, both from a fresh clone: `make demo` (the toy end to end) and `make test`.
# torch is pinned to the CPU wheel that this machine has on disk; an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/knnmoe-ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e ".[test]"
	touch $@

.PHONY: install demo test
install: $(BIN)/knnmoe-ready

demo: install
	OMP_NUM_THREADS=1 $(BIN)/python scripts/demo.py

test: install
	OMP_NUM_THREADS=2 $(BIN)/pytest -q
