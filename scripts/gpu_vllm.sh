#!/usr/bin/env bash
# GPU check of vllm-knnmoe (issue 22): compiled + piecewise CUDA graphs against plain `vllm` with its defaults.
# Made for one large NVIDIA GPU and at most ~8 minutes; carries no files beyond the repository (no weights: the
# model has OLMoE-1B-7B's dimensions with random bf16 weights, 4 of its 16 layers; the keys are synthetic).
#   1. installs what is missing (vllm for CUDA, faiss-cpu, this package) if a package index is reachable;
#   2. the equivalence test on the GPU: far memory, compiled + CUDA graphs, equals plain vllm bit for bit;
#   3. scripts/perf_vllm.py: vllm (defaults) vs vllm-knnmoe exact at 100k keys per layer (the torch index on the
#      GPU), loglikelihood and generation; target >= 0.95x. Figures go to $OUT (or ./results).
#     bash scripts/gpu_vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  "$PY" -m pip install -q vllm faiss-cpu || { echo "vllm for CUDA is not importable and cannot be installed here"; exit 2; }
fi
"$PY" -m pip install -q --no-deps -e . >/dev/null 2>&1 || true  # registers the vllm.general_plugins entry point
"$PY" -c "import lm_eval, faiss" 2>/dev/null || "$PY" -m pip install -q "lm-eval>=0.4.13,<0.5" faiss-cpu safetensors
"$PY" -c "from importlib.metadata import entry_points as e; assert any(p.name == 'knnmoe' for p in e(group='vllm.general_plugins'))" \
  || { echo "the knnmoe vLLM plugin entry point is not installed (pip install -e .)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 200 "$PY" -m pytest -q -x tests_vllm/test_vllm_knnmoe.py -k "far_memory or opcheck or compilation_config" \
  2>&1 | tail -5 | tee "$OUT/gpu_tests.txt" || true
timeout 280 "$PY" scripts/perf_vllm.py --layers 4 --dtype bfloat16 --keys 100000 --indexes exact --prompts 128 \
  --score-chars 256 --gen 64 --no-eager --allow-load --json "$OUT/perf_vllm_gpu.json" 2>&1 | tail -8 | tee "$OUT/perf_vllm_gpu.txt"
