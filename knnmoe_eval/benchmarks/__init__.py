"""The Python behind the benchmark tasks in `tasks/` (GPQA, MMLU, SuperGPQA, USMLE, MedMCQA, MBPP): their
reference-versus-test splits, prompts, answer parsing, the similarity 5-shot sampler and MBPP's sandboxed tests.
A new benchmark is a `data.BENCHMARK_SPLITS` entry, a normaliser in `data.py` and a folder of YAML under `tasks/`."""
