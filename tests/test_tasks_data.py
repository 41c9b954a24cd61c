"""Benchmark splits on fixture files in each hub schema: sizes, gold answers, disjointness, pure shuffles, subsets."""

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from knnmoe_eval.benchmarks import data as B
from knnmoe_eval.errors import KnnMoeError

DATA = Path(__file__).parent / "fixtures" / "data"

# (test, reference) sizes the fixtures must give; the full datasets' sizes are in docs/tasks.md.
FIXTURE_SIZES = {"gpqa": (3, 6), "mmlu": (4, 8), "supergpqa": (16, 2), "medqa": (3, 6), "medmcqa": (3, 5), "mbpp": (4, 6)}


def sets(bench, **kwargs):
    return B.split_sets(bench, data_dir=DATA, **kwargs)


def rows(bench, split):
    return [json.loads(line) for line in (DATA / bench / f"{split}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bench", B.BENCHMARK_SPLITS)
def test_split_sizes(bench):
    test, reference = sets(bench)
    assert (len(test), len(reference)) == FIXTURE_SIZES[bench]
    assert len(sets(bench, with_reference=False)[0]) == len(test)


@pytest.mark.parametrize("bench", B.BENCHMARK_SPLITS)
def test_reference_and_test_are_disjoint(bench):
    test, reference = sets(bench)
    assert not {d["id"] for d in test} & {d["id"] for d in reference}
    assert not {B._text_key(d) for d in test} & {B._text_key(d) for d in reference}


def test_gold_answers_follow_each_schema():
    gold = {bench: {d["id"]: B.doc_to_target(d) for d in sets(bench)[0]} for bench in B.BENCHMARK_SPLITS if bench != "mbpp"}
    assert gold["mmlu"] == {"test-0": "A", "test-1": "C", "test-2": "D", "test-3": "B"}
    assert gold["medqa"] == {"test-0": "B", "test-1": "A", "test-2": "C"}
    assert gold["medmcqa"] == {"mc-va-1": "A", "mc-va-2": "A", "mc-va-3": "C"}
    assert gold["supergpqa"]["sg07"] == "B" and gold["supergpqa"]["sg14"] == "C"
    correct = {r["Record ID"]: r["Correct Answer"] for r in rows("gpqa", "gpqa_diamond")}
    for doc in sets("gpqa")[0]:
        assert doc["choices"][doc["answer"]] == correct[doc["id"]]
    mbpp_test = sets("mbpp")[0]
    assert [d["id"] for d in mbpp_test] == ["2", "11", "12", "511"]  # prompt, test, validation: task ids 1-600
    assert B.mbpp_doc_to_target(mbpp_test[0]).endswith("return (res) \n[DONE]")


def test_gpqa_reference_is_main_minus_diamond_by_record_id():
    main = {r["Record ID"] for r in rows("gpqa", "gpqa_main")}
    diamond = {r["Record ID"] for r in rows("gpqa", "gpqa_diamond")}
    test, reference = sets("gpqa")
    assert {d["id"] for d in test} == diamond
    assert {d["id"] for d in reference} == main - diamond


def test_reference_drops_text_duplicates_of_test_questions():
    reference_ids = {d["id"] for d in sets("medmcqa")[1]}
    assert "mc-tr-1" not in reference_ids and "mc-tr-6" not in reference_ids  # a validation question, reworded case


def test_gpqa_option_order_is_pure_seeded_and_varied():
    first, again = sets("gpqa"), sets("gpqa")
    assert first == again
    code = (
        "import json; from knnmoe_eval.benchmarks.data import split_sets; "
        f"print(json.dumps(split_sets('gpqa', data_dir={str(DATA)!r})[0]))"
    )
    for hash_seed in ("1", "2"):
        other = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        assert json.loads(other.stdout) == first[0]
    positions = {B.shuffled_options(f"rec{i}", "right", ["w1", "w2", "w3"])[1] for i in range(40)}
    assert positions == {0, 1, 2, 3}
    assert any(
        B.shuffled_options(f"rec{i}", "r", ["a", "b", "c"], seed=1) != B.shuffled_options(f"rec{i}", "r", ["a", "b", "c"], seed=2)
        for i in range(10)
    )


def test_reference_subsets_are_nested_seeded_and_row_order_free(tmp_path):
    full = sets("mmlu")[1]
    for n in range(1, len(full) + 1):
        assert sets("mmlu", ref_size=n)[1] == full[:n]
    reseeded = sets("mmlu", seed=7)[1]
    assert [d["id"] for d in reseeded] != [d["id"] for d in full]
    assert sorted(d["id"] for d in reseeded) == sorted(d["id"] for d in full)

    shutil.copytree(DATA / "gpqa", tmp_path / "gpqa")
    lines = (tmp_path / "gpqa" / "gpqa_main.jsonl").read_text().splitlines()
    random.Random(0).shuffle(lines)
    (tmp_path / "gpqa" / "gpqa_main.jsonl").write_text("\n".join(lines) + "\n")
    assert B.split_sets("gpqa", data_dir=tmp_path, ref_size=3)[1] == sets("gpqa", ref_size=3)[1]


def test_ref_size_outside_the_pool_is_an_error():
    with pytest.raises(KnnMoeError, match=r"ref_size=9 is outside 1\.\.8"):
        sets("mmlu", ref_size=9)


def test_supergpqa_holds_out_a_seeded_share_of_its_one_split():
    test, reference = sets("supergpqa")
    assert len(reference) == round(18 * 3_000 / 26_529)
    assert {d["id"] for d in test} | {d["id"] for d in reference} == {r["uuid"] for r in rows("supergpqa", "train")}
    assert max(len(d["choices"]) for d in test + reference) == 10


def test_test_subset_is_seeded_and_its_leftovers_stay_out_of_the_reference(monkeypatch):
    monkeypatch.setitem(B.BENCHMARK_SPLITS, "medqa", dataclasses.replace(B.BENCHMARK_SPLITS["medqa"], reference=("train", "test"), test_size=2))
    test, reference = sets("medqa")
    assert len(test) == 2 and [d["id"] for d in test] == [d["id"] for d in sets("medqa")[0]]
    assert not {d["id"] for d in reference} & {"test-0", "test-1", "test-2"}


def test_missing_file_names_the_file_and_the_layout(tmp_path):
    shutil.copytree(DATA / "medqa", tmp_path / "medqa")
    (tmp_path / "medqa" / "train.jsonl").unlink()
    with pytest.raises(KnnMoeError) as err:
        B.split_sets("medqa", data_dir=tmp_path)
    assert str(tmp_path / "medqa" / "train.jsonl") in str(err.value)
    assert "test.jsonl, train.jsonl" in str(err.value) and "GBaker/MedQA-USMLE-4-options-hf" in str(err.value)
    assert len(B.split_sets("medqa", data_dir=tmp_path, with_reference=False)[0]) == 3


def test_unknown_benchmark_and_part_are_errors():
    with pytest.raises(KnnMoeError, match="choose one of gpqa, mmlu"):
        B.split_sets("arc", data_dir=DATA)
    with pytest.raises(KnnMoeError, match="part must be"):
        B.load("mmlu", "train", data_dir=DATA)


def test_without_data_dir_the_hub_is_tried_and_its_failure_points_to_data_dir(monkeypatch):
    import datasets

    calls = []

    def unreachable(path, name=None, split=None):
        calls.append((path, name, split))
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(KnnMoeError, match=r"pass --metadata data_dir=DIR with DIR/gpqa/gpqa_diamond\.jsonl"):
        B.split_sets("gpqa")
    with pytest.raises(KnnMoeError, match="cais/mmlu"):
        B.split_sets("mmlu")
    assert calls == [("Idavidrein/gpqa", "gpqa_diamond", "train"), ("cais/mmlu", "all", "test")]
