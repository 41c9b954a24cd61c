import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from knnmoe_eval.core.families import FAMILIES
from knnmoe_eval.testing import empty_keys, make_tiny_model, router_inputs, save_tiny, signature, small_toy
from knnmoe_eval.testing import write_constant_memory

SMALL_TOY = small_toy()
TASKS = os.path.join(os.path.dirname(__file__), "fixtures", "tasks")


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


__all__ = ["make_tiny_model", "signature", "router_inputs", "write_constant_memory", "empty_keys", "TASKS", "SMALL_TOY"]
