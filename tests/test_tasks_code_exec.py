"""Sandboxed MBPP pass@1: opt-in, and every way a program can fail fails only its own problem."""

from pathlib import Path

import pytest

from knnmoe_eval.benchmarks import code_exec
from knnmoe_eval.benchmarks import data as B
from knnmoe_eval.errors import KnnMoeError

TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]


@pytest.fixture(autouse=True)
def opted_in(monkeypatch):
    monkeypatch.setenv(code_exec.OPT_IN_ENV, "1")


@pytest.mark.parametrize(
    ("program", "passed"),
    [
        ("def add(a, b):\n    return a + b", True),
        ("def add(a, b):\n    return a * b", False),
        ("def add(a, b):\n    return a +", False),  # syntax error
        ("import sys\nsys.exit(0)", False),  # exits with status 0 before the asserts
        ("import os\nos._exit(0)", False),
        ("exit()", False),
        ("import ctypes\nctypes.string_at(0)", False),  # segfault
        ("x = bytearray(8 << 30)", False),  # over the memory limit
        ("import time\ntime.sleep(60)", False),  # hangs
    ],
)
def test_pass_at_1_outcomes(program, passed):
    assert code_exec.passes(program, TESTS, timeout=2) is passed


def test_setup_code_runs_first():
    assert code_exec.passes("def add(a, b):\n    return a + b + OFFSET", TESTS, setup="OFFSET = 0")


def test_no_code_runs_without_opt_in(monkeypatch):
    monkeypatch.delenv(code_exec.OPT_IN_ENV)
    with pytest.raises(KnnMoeError, match="HF_ALLOW_CODE_EVAL=1"):
        code_exec.passes("def add(a, b):\n    return a + b", TESTS)
    with pytest.raises(KnnMoeError, match="--confirm_run_unsafe_code"):
        B.load("mbpp", "test", data_dir=Path(__file__).parent / "fixtures" / "data", runs_code=True)


def test_mbpp_scoring_reads_the_program_out_of_the_completion():
    doc = {"test_list": TESTS, "test_setup_code": ""}
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert B.mbpp_process_generation(doc, [fenced]) == {"pass@1": 1, "acc": 1}
    assert B.mbpp_process_generation(doc, ["def add(a, b):\n    return a + b\n[DONE] trailing"]) == {"pass@1": 1, "acc": 1}
    assert B.mbpp_process_generation(doc, ["lol"]) == {"pass@1": 0, "acc": 0}
