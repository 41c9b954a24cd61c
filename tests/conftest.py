import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from knnmoe_eval.core.families import FAMILIES
from knnmoe_eval.testing import save_tiny


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

