"""The lm-evaluation-harness integration: the `hf-knnmoe` model (`lm.py`, with the build mode), `vllm-knnmoe`
(lm-eval's vLLM backend, `vllm_lm.py`, with its worker half in `vllm_worker.py`), kNN-MoE (Selective)
(`selective.py`), how lm-eval requests become reference sequences for a build (`requests.py`), and pseudo-labels
for unlabelled reference sets (`labels.py`)."""
