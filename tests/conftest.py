import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite never reaches a hub: set before huggingface_hub is imported, so that a lookup nobody meant (lm-eval's
# `dummy` model asks for gpt2's tokenizer) fails at once instead of waiting out the network's timeout (46 s here)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from knnmoe_eval.core.families import FAMILIES
from knnmoe_eval.testing import make_tiny_model, router_inputs, save_tiny, write_constant_memory

_MEM_IDS = torch.randint(4, 250, (1, 12), generator=torch.Generator().manual_seed(0))


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



@pytest.fixture
def model():
    return make_tiny_model("olmoe")


@pytest.fixture
def mem_ids():
    """The tokens whose router inputs are `mem`'s keys: near the memory."""
    return _MEM_IDS


@pytest.fixture
def mem(tmp_path, model, mem_ids):
    """A memory of `model`'s own router inputs on `mem_ids` (so those tokens are near it) with seeded values."""
    values = lambda l, n, e: torch.randn(n, e, generator=torch.Generator().manual_seed(l)) * 10  # noqa: E731
    return write_constant_memory(tmp_path / "mem", model, router_inputs(model, mem_ids), values)
