"""The experiments runner, reduced: two benchmarks, few items, every method, every ablation."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from knnmoe_eval import ablations, toy
from knnmoe_eval.experiments import Runner, Settings, main, table
from knnmoe_eval.tiny import save_tiny

from test_toy import SMALL

ROOT = Path(__file__).resolve().parent.parent
TOY_METHODS = ["Zero-shot", "LoRA SFT", "Router-only SFT", "kNN-MoE", "kNN-MoE (IVFPQ)", "kNN-MoE (Selective)",
               "kNN-MoE (grad=dense)", "kNN-MoE (plus)"]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return str(toy.train_or_load(tmp_path_factory.mktemp("toy"), replace(SMALL, n_shift_ref=40, n_shift_test=16), progress=False))


def toy_settings(toy_dir, out, **kw):
    return Settings(pretrained=toy_dir, out=str(out), benchmarks=("toy_shift", "toy_indomain"), limit=12,
                    ref_limit=40, sft_epochs=1, bootstrap=200, batch_size=8, **kw)


def test_table_has_every_method_and_is_reused(toy_dir, tmp_path, monkeypatch):
    result = table(Runner(toy_settings(toy_dir, tmp_path)))
    cells = result["table"]
    assert list(cells) == result["methods"] == TOY_METHODS and not result["errors"]
    for method, row in cells.items():
        assert list(row) == result["columns"] == ["toy_shift", "toy_indomain", "Avg."]
        assert [c["n"] for c in row.values()] == [12, 12, 24]
        avg = (row["toy_shift"]["score"] + row["toy_indomain"]["score"]) / 2  # equal item counts
        assert row["Avg."]["score"] == pytest.approx(avg)
        for c in row.values():
            assert (c["p"] is None) == (method == "Zero-shot")
            assert c["significant"] == (c["p"] is not None and c["p"] < 0.05)
    markdown = (tmp_path / "table.md").read_text()
    assert markdown.splitlines()[0] == "| Method | toy_shift | toy_indomain | Avg. |"
    assert all(f"| {m} |" in markdown for m in TOY_METHODS)

    # a second run evaluates, builds and trains nothing, and gives the same table, p-values included (seeded)
    def refuse(*args, **kwargs):
        raise AssertionError("a finished piece was recomputed")

    monkeypatch.setattr(Runner, "_evaluate", refuse)
    monkeypatch.setattr("knnmoe_eval.sft.train_sft", lambda *a, **k: None)
    again = table(Runner(toy_settings(toy_dir, tmp_path)))
    assert again["table"] == cells


def test_changed_settings_recompute_only_what_they_touch(toy_dir, tmp_path):
    runner = Runner(toy_settings(toy_dir, tmp_path))
    from knnmoe_eval.experiments import BENCHMARKS

    bench = BENCHMARKS["toy_shift"]
    first = runner.knn(bench, k=1)
    memories = sorted(p.name for p in (tmp_path / "memories").iterdir())
    second = runner.knn(bench, k=2)
    assert second["config"]["k"] == 2 and first["config"]["k"] == 1
    assert sorted(p.name for p in (tmp_path / "memories").iterdir()) == memories  # same memory, new evaluation


@pytest.fixture(scope="module")
def ablation_out(tmp_path_factory):
    return tmp_path_factory.mktemp("ablations")  # shared, so that later ablations reuse earlier pieces


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.e2e) if n == "plus" else n
                                  for n in ablations.ABLATIONS])
def test_every_ablation_writes_table_json_and_plot(name, toy_dir, ablation_out, monkeypatch):
    tmp_path = ablation_out
    runner = Runner(toy_settings(toy_dir, tmp_path, judge="knn-dense", n_values=(0, 32, 40), k_values=(1, 2),
                                 step_values=(1, 2)))
    markdown = ablations.run(runner, name)
    rows = json.loads((tmp_path / "ablations" / f"{name}.json").read_text())["rows"]
    assert (tmp_path / "ablations" / f"{name}.png").stat().st_size > 1000
    assert markdown.count("\n|") == len(rows) + 2  # header, rule, one line per row
    if name == "n":
        assert [r["N"] for r in rows] == [0, 32, 40]
        zero = runner.zero_shot(runner_bench("toy_shift"))
        assert rows[0]["toy_shift"] == sum(zero["scores"]) / len(zero["scores"])  # N = 0 is zero-shot
    if name == "k":
        assert rows[0]["top-1 share"] == 1.0  # one neighbour holds all the mass
        assert 0.5 <= rows[1]["top-1 share"] <= 1.0
    if name == "ppl":
        assert [r["PPL bucket"] for r in rows] == ["High", "Mid", "Low"] and sum(r["items"] for r in rows) == 24
    if name == "latency":
        assert {r["index"] for r in rows} == {"none (zero-shot)", "exact", "ivfpq"}
    if name == "unlabelled":
        assert [r["labels"] for r in rows] == ["none (zero-shot)", "gold", "self", "judge"]
    if name == "plus":
        assert [r["kNN-MoE"] for r in rows] == ["paper", "plus", *(f"plus − {i}" for i in ablations.PLUS_INGREDIENTS)]


def runner_bench(name):
    from knnmoe_eval.experiments import BENCHMARKS

    return BENCHMARKS[name]


def test_generative_table_with_similarity_fewshot(tmp_path, monkeypatch):
    """The paper's scoring: generation + answer parsing, with the similarity 5-shot row, on the fixture data."""
    monkeypatch.setenv("KNNMOE_FEWSHOT_ENCODER", "tfidf")
    model = save_tiny("olmoe", tmp_path / "model")
    main(["table", "--pretrained", str(model), "--benchmarks", "gpqa,medmcqa", "--scoring", "gen", "--limit", "2",
          "--ref_limit", "4", "--sft_epochs", "1", "--gen_kwargs", "max_gen_toks=4", "--bootstrap", "100",
          "--out", str(tmp_path / "out"), "--metadata", json.dumps({"data_dir": str(ROOT / "tests/fixtures/data")})])
    result = json.loads((tmp_path / "out" / "table.json").read_text())
    assert result["methods"] == TOY_METHODS[:1] + ["5-shot (similar)"] + TOY_METHODS[1:]
    assert result["columns"] == ["gpqa", "medmcqa", "Avg."]
    assert all(set(row) == set(result["columns"]) for row in result["table"].values())
    # 4 references give 8 keys per layer, too few to train IVFPQ: the row says so instead of failing the table
    assert set(result["errors"]) == {"kNN-MoE (IVFPQ) on gpqa", "kNN-MoE (IVFPQ) on medmcqa"}
    assert "index=exact" in (tmp_path / "out" / "table.md").read_text()
