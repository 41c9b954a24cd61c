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

# The demo's figures are the same on every x86 CPU: one thread, MKL's conditional-numerical-reproducibility mode
# and ATen/oneDNN's baseline kernels (AVX2 and SSE4.2 machines otherwise train a slightly different toy).
REPRO := OMP_NUM_THREADS=1 MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41

demo: install
	$(REPRO) $(BIN)/python scripts/demo.py

test: install
	OMP_NUM_THREADS=2 $(BIN)/pytest -q
