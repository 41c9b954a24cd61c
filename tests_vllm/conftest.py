"""Fixtures of the vLLM suite: tiny models vLLM's CPU backend can run, memories, and engines started once.

Run in `.venv-vllm` (the Makefile's `make test` does). vLLM's CPU attention refuses the main suite's tiny models
(head_dim 8), so these have hidden 128 and 2 heads (head_dim 64), in float32.
"""

import gc
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default (4) is far beyond these models
# no hub: a lookup nobody meant fails at once instead of waiting out the network's timeout (tests/conftest.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval
import lm_eval.tasks
import pytest
import torch

from knnmoe_eval.core.memory import write_memory
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.core.signature import model_signature
from knnmoe_eval.testing import save_tiny

TASKS = os.path.join(os.path.dirname(__file__), os.pardir, "tests", "fixtures", "tasks")
VLLM_SIZE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64)
COMPILED = "dtype=float32,max_model_len=256,seed=0"  # vLLM's defaults: on CPU, Dynamo (fullgraph) + inductor
ENGINE = COMPILED + ",enforce_eager=True"
_TASK_MANAGER = []


def evaluate(lm, tasks, **kw):
    """lm-eval on an LM object (one engine serves several calls) or a model name with model_args."""
    if not _TASK_MANAGER:  # indexing lm-eval's task YAMLs takes seconds: once
        _TASK_MANAGER.append(lm_eval.tasks.TaskManager(include_path=TASKS))
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=_TASK_MANAGER[0], log_samples=True, **kw)


def per_doc(results, task):
    return [(s["doc_id"], s["resps"]) for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def shutdown(lm):
    lm.model.llm_engine.engine_core.shutdown()
    del lm.model
    gc.collect()


def tiny(family, path, seed=0):
    return str(save_tiny(family, path, seed=seed, **VLLM_SIZE))


def signature_of(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return model_signature(model, find_routers(model))


def far_memory(model_dir, out, n=16):
    """Keys far from any router input (lambda underflows to exactly 0) with values that would change routing."""
    sig = signature_of(model_dir)
    g = torch.Generator().manual_seed(0)
    keys = {l: 100 + torch.randn(n, sig["hidden_size"], generator=g) for l in sig["moe_layers"]}
    values = {l: 50 * torch.randn(n, sig["num_experts"], generator=g) for l in sig["moe_layers"]}
    return str(write_memory(out, keys, values, sig))


@pytest.fixture(scope="session")
def olmoe_dir(tmp_path_factory):
    return tiny("olmoe", tmp_path_factory.mktemp("olmoe"))
