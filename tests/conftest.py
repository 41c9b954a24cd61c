import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from knnmoe_eval.core.families import FAMILIES
from knnmoe_eval.core.hooks import hooked_routers
from knnmoe_eval.core.memory import write_memory
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.core.signature import model_signature
from knnmoe_eval.experiments.toy import ToyConfig
from knnmoe_eval.testing import make_tiny_model, save_tiny

# a toy small enough to train in a fraction of a second (2 steps): for the data, the tasks and the pipeline, not
# for accuracy
SMALL_TOY = ToyConfig(n_train=64, n_indomain_test=12, n_shift_ref=6, n_shift_test=10, steps=2, batch_size=8)

TASKS = os.path.join(os.path.dirname(__file__), "fixtures", "tasks")


def pytest_report_header(config):
    return f"torch CPU kernels: {torch.backends.cpu.get_cpu_capability()} (ATEN_CPU_CAPABILITY forces a level)"


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family): a saved tiny model of `family` with the tokenizer, written once per session."""
    saved = {}

    def get(family):
        if family not in saved:
            saved[family] = str(save_tiny(family, tmp_path_factory.mktemp(family)))
        return saved[family]

    return get


@pytest.fixture(scope="session")
def olmoe_dir(tiny_dir):
    return tiny_dir("olmoe")


def signature(model):
    return model_signature(model, find_routers(model))


def router_inputs(model, input_ids):
    """Every MoE layer's router inputs (n_tokens, d) for `input_ids`, under stock routing."""
    keys = {}

    def record(site, h, z):
        keys[site.layer] = h.detach().clone()
        return z

    with torch.no_grad(), hooked_routers(find_routers(model), record):
        model(input_ids)
    return keys


def write_constant_memory(path, model, keys, values_fn):
    """A memory with the given keys per layer and values_fn(layer, n, E) as values."""
    sig = signature(model)
    values = {l: values_fn(l, keys[l].shape[0], sig["num_experts"]) for l in sig["moe_layers"]}
    return write_memory(path, keys, values, sig)


def empty_keys(model):
    sig = signature(model)
    return {l: torch.zeros(0, sig["hidden_size"]) for l in sig["moe_layers"]}


__all__ = ["make_tiny_model", "signature", "router_inputs", "write_constant_memory", "empty_keys", "TASKS", "SMALL_TOY"]
