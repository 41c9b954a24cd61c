"""Options: one parser for every model class's model_args, and the README's table generated from the fields."""

from pathlib import Path

import pytest

from knnmoe_eval import KnnMoeError
from knnmoe_eval.core.options import KnnMoeOptions, markdown_table, split_model_args

README = Path(__file__).parents[1] / "README.md"


def test_readme_option_table_is_the_generated_one():
    assert markdown_table() in README.read_text(), "regenerate it: python -m knnmoe_eval.core.options"


@pytest.mark.parametrize("given, expected", [
    ({"sigma": "auto", "nprobe": "none", "k": "4", "eta": "5", "verify": "False"},
     {"sigma": None, "nprobe": None, "k": 4, "eta": 5.0, "verify": False}),
    ({"k": 2.0, "verify": True, "max_distance": 3}, {"k": 2, "verify": True, "max_distance": 3.0}),
])
def test_model_args_are_parsed_by_the_fields_types(given, expected):
    opts, rest = split_model_args({"memory": "m", "dtype": "float32", **given}, {"dtype"})
    assert {k: getattr(opts, k) for k in expected} == expected and rest == {"dtype": "float32"}
    assert all(type(getattr(opts, k)) is type(v) for k, v in expected.items())


@pytest.mark.parametrize("given, error", [
    ({"k": "2.5"}, "k='2.5' must be an integer"),
    ({"eta": "fast"}, "eta='fast' is not a number"),
    ({"verify": "maybe"}, "verify='maybe': choose true or false"),
    ({"simlarity": "rbf"}, "did you mean 'similarity'"),
])
def test_bad_model_args_are_refused_with_the_fix(given, error):
    with pytest.raises(KnnMoeError, match=error):
        split_model_args({"memory": "m", **given}, set())


def test_every_option_has_help_and_a_default():
    from dataclasses import fields

    assert all(f.metadata["help"] and "default" in f.metadata for f in fields(KnnMoeOptions))
