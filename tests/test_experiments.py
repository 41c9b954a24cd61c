"""The experiments runner, reduced: two benchmarks, few items, every method, every ablation."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from knnmoe_eval.experiments import ablations, toy
from knnmoe_eval.experiments.cli import main
from knnmoe_eval.experiments.runner import BENCHMARKS, DENSE, METHODS, TABLE1, Runner, Settings, table
from knnmoe_eval.errors import KnnMoeError
from knnmoe_eval.testing import save_tiny, small_toy

pytestmark = pytest.mark.e2e  # every test here runs lm-eval evaluations, builds and SFT on a toy

ROOT = Path(__file__).resolve().parent.parent
TOY_METHODS = ["Zero-shot", "LoRA SFT", "Router-only SFT", "kNN-MoE", "kNN-MoE (IVFPQ)", "kNN-MoE (Selective)",
               "kNN-MoE (grad=dense)", "kNN-MoE (plus)", "C3PO"]


@pytest.fixture(autouse=True)
def no_probe(monkeypatch):
    """This barely trained toy has no radius clear of the model's own samples, and preset=plus's probe would refuse
    every uncalibrated plus memory (as it should: tests/test_plus.py tests that refusal); these tests are about the
    runner, so its plus builds skip the probe."""
    from knnmoe_eval.core.options import PRESETS

    monkeypatch.setitem(PRESETS["plus"], "probe_tokens", 0)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return str(toy.train_or_load(tmp_path_factory.mktemp("toy"), replace(small_toy(), n_shift_ref=40, n_shift_test=16), progress=False))


def toy_settings(toy_dir, out, **kw):
    return Settings(pretrained=toy_dir, out=str(out), benchmarks=("toy_shift", "toy_indomain"), limit=12,
                    ref_limit=40, sft_epochs=1, bootstrap=200, batch_size=8, **kw)


def test_methods_and_scoring_defaults_are_the_papers(capsys):
    """--methods defaults to Table 1's rows (zero-shot always kept, the paper's order kept), 'all' is every method,
    an unknown name is refused; --help lists every method on its own line; generative scoring is the default."""
    assert Settings(pretrained="x").methods == TABLE1 == ("zero-shot", "5-shot", "lora", "router", "knn", "knn-ivfpq")
    assert Settings(pretrained="x").scoring == "gen"
    assert Settings(pretrained="x", methods=("all",)).methods == tuple(METHODS)
    assert Settings(pretrained="x", methods=("c3po", "knn")).methods == ("zero-shot", "knn", "c3po")
    with pytest.raises(KnnMoeError, match="unknown method.*'ivfpq'.*knn-ivfpq"):
        Settings(pretrained="x", methods=("ivfpq",))
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for key, (row, _) in METHODS.items():
        assert sum(line.split()[:1] == [key] and f"{row}:" in line for line in lines) == 1, key
    # the toys have no generative task: loglikelihood under either scoring; a paper benchmark follows the setting
    assert BENCHMARKS["toy_shift"].test_task("gen") == BENCHMARKS["toy_shift"].test_task("loglik") == "knnmoe_toy_shift"
    gpqa = BENCHMARKS["gpqa"]
    assert gpqa.test_task("gen") == "knnmoe_gpqa_gen" and gpqa.test_task("loglik") == "knnmoe_gpqa"
    with pytest.raises(KnnMoeError, match="mbpp has no loglik"):
        BENCHMARKS["mbpp"].test_task("loglik")


def test_table_has_every_method_and_is_reused(toy_dir, tmp_path, monkeypatch):
    result = table(Runner(toy_settings(toy_dir, tmp_path, methods=("all",))))
    cells = result["table"]
    assert list(cells) == result["methods"] == TOY_METHODS and not result["errors"]
    assert result["scoring"] == {"toy_shift": "loglik", "toy_indomain": "loglik"}  # the default gen: the toys' own
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
    assert ("Scored by multiple-choice loglikelihood: toy_shift, toy_indomain (the toys have no generative task)"
            in markdown)
    assert "5-shot (similar) not run on toy_shift, toy_indomain: it is generative" in markdown  # asked for by all

    # a second run evaluates, builds and trains nothing, and gives the same table, p-values included (seeded)
    def refuse(*args, **kwargs):
        raise AssertionError("a finished piece was recomputed")

    monkeypatch.setattr(Runner, "_evaluate", refuse)
    monkeypatch.setattr("knnmoe_eval.experiments.sft.train_sft", lambda *a, **k: None)
    again = table(Runner(toy_settings(toy_dir, tmp_path, methods=("all",))))
    assert again["table"] == cells


def test_changed_settings_recompute_only_what_they_touch(toy_dir, tmp_path):
    runner = Runner(toy_settings(toy_dir, tmp_path))
    bench = BENCHMARKS["toy_shift"]
    first = runner.knn(bench, k=1)
    memories = sorted(p.name for p in (tmp_path / "memories").iterdir())
    second = runner.knn(bench, k=2)
    assert sorted(p.name for p in (tmp_path / "memories").iterdir()) == memories  # same memory ...
    # ... and a new evaluation that searched two neighbours: the nearest no longer holds all the similarity mass
    shares = lambda run: [d["top1_share"] for d in run["diagnostics"].values()]  # noqa: E731
    assert shares(first) == [1.0, 1.0]
    assert all(s is not None and s < 1.0 for s in shares(second))


@pytest.fixture(scope="module")
def shared_pieces(toy_dir, tmp_path_factory):
    """The pieces most ablations reuse (zero-shot runs, perplexities, the paper and dense memories), computed
    once; each ablation starts from its own copy, so no ablation depends on which ran before it."""
    out = tmp_path_factory.mktemp("pieces")
    runner = Runner(toy_settings(toy_dir, out, judge="knn-dense"))
    for name in ("toy_shift", "toy_indomain"):
        bench = BENCHMARKS[name]
        runner.zero_shot(bench), runner.perplexity(bench), runner.knn(bench), runner.memory(bench, **DENSE)
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.e2e) if n == "plus" else n
                                  for n in ablations.ABLATIONS])
def test_every_ablation_writes_table_json_and_plot(name, toy_dir, shared_pieces, tmp_path):
    shutil.copytree(shared_pieces, tmp_path, dirs_exist_ok=True)
    runner = Runner(toy_settings(toy_dir, tmp_path, judge="knn-dense", n_values=(0, 32, 40), k_values=(1, 2),
                                 step_values=(1, 2), seeds=(0, 1)))
    markdown = ablations.ablate(runner, name)
    rows = json.loads((tmp_path / "ablations" / f"{name}.json").read_text())["rows"]
    assert (tmp_path / "ablations" / f"{name}.png").stat().st_size > 1000
    assert markdown.count("\n|") == len(rows) + 2  # header, rule, one line per row
    if name == "n":
        assert [r["N"] for r in rows] == [0, 32, 40]
        zero = runner.zero_shot(BENCHMARKS["toy_shift"])
        assert rows[0]["toy_shift"] == sum(zero["scores"]) / len(zero["scores"])  # N = 0 is zero-shot
    if name == "k":
        assert rows[0]["top-1 share"] == 1.0  # one neighbour holds all the mass
        assert rows[1]["top-1 share"] < 1.0  # the second neighbour takes some of the mass
    if name == "ppl":
        assert [r["PPL bucket"] for r in rows] == ["High", "Mid", "Low"] and sum(r["items"] for r in rows) == 24
    if name == "latency":
        assert {r["index"] for r in rows} == {"none (zero-shot)", "exact", "ivfpq", "none (C3PO)"}
        for r in rows:  # the paper's Table 8 unit: 12 + 12 test items
            expected = None if r["eval s"] is None else pytest.approx(1000 * r["eval s"] / 24)
            assert r["ms per example"] == expected
            assert (r["peak MiB"] is None) == (r["eval s"] is None) and (r["peak MiB"] or 100) >= 100  # a process
    if name == "cost":
        assert rows[-1]["method"] == "C3PO" and rows[-1]["build s"] > 0 and rows[-1]["eval s"] > 0
        exact, ivfpq = rows[0], rows[1]  # the same memory; IVFPQ's build adds its index training (Table 7)
        assert ivfpq["method"] == "kNN-MoE (IVFPQ)" and ivfpq["index s"] > 0 and exact["index s"] is None
        assert ivfpq["build s"] == pytest.approx(exact["build s"] + ivfpq["index s"])
    if name == "load_balance":
        assert [r["method"] for r in rows] == ["Zero-shot", "LoRA SFT", "Router-only SFT", "kNN-MoE"]
        assert all(0 < r["Avg."] < 8 for r in rows)  # the toy: 8 experts, top-2 (balanced: 2)
        assert len({r["Avg."] for r in rows}) == 4  # each method routes differently
    if name == "seeds":
        assert [r["benchmark"] for r in rows] == ["toy_shift", "toy_indomain"]
        table_run = runner.sft(BENCHMARKS["toy_shift"], "lora")  # seed 0 is the table's run, reused
        other = runner.sft(BENCHMARKS["toy_shift"], "lora", seed=1)
        scores = [sum(r["scores"]) / len(r["scores"]) for r in (table_run, other)]
        assert rows[0]["LoRA SFT mean"] == pytest.approx(sum(scores) / 2)
        assert rows[0]["LoRA SFT std"] == pytest.approx(abs(scores[0] - scores[1]) / 2 ** 0.5)
    if name == "unlabelled":
        assert [r["labels"] for r in rows] == ["none (zero-shot)", "gold", "self", "judge"]
    if name == "plus":
        assert [r["kNN-MoE"] for r in rows] == ["paper", "plus", *(f"plus − {i}" for i in ablations.PLUS_INGREDIENTS)]


def test_generative_table_with_similarity_fewshot(tmp_path, monkeypatch):
    """The runner's defaults: the paper's scoring (generation + answer parsing) and Table 1's methods, with the
    similarity 5-shot row, on the fixture data."""
    monkeypatch.setenv("KNNMOE_FEWSHOT_ENCODER", "tfidf")
    # our re-ranked IVFPQ cannot train on 8 keys per layer: the row says so instead of failing the table
    monkeypatch.setattr(Runner, "knn_ivfpq", lambda self, bench: self.knn(bench, "knn-ivfpq", index="ivfpq_rerank"))
    model = save_tiny("olmoe", tmp_path / "model")
    main(["table", "--pretrained", str(model), "--benchmarks", "gpqa,medmcqa", "--limit", "2",
          "--ref_limit", "4", "--sft_epochs", "1", "--gen_kwargs", "max_gen_toks=4", "--bootstrap", "100",
          "--out", str(tmp_path / "out"), "--metadata", json.dumps({"data_dir": str(ROOT / "tests/fixtures/data")})])
    result = json.loads((tmp_path / "out" / "table.json").read_text())
    assert result["methods"] == [METHODS[m][0] for m in TABLE1]
    assert result["scoring"] == {"gpqa": "gen", "medmcqa": "gen"}
    for run in ("zero-shot", "knn"):  # every method generated its answers: the generative task ran
        record = json.loads((tmp_path / "out" / "runs" / run / "gpqa.json").read_text())
        assert record["config"]["task"] == "knnmoe_gpqa_gen"
    assert result["columns"] == ["gpqa", "medmcqa", "Avg."]
    assert all(set(row) == set(result["columns"]) for row in result["table"].values())
    assert set(result["errors"]) == {"kNN-MoE (IVFPQ) on gpqa", "kNN-MoE (IVFPQ) on medmcqa"}
    assert "index=exact" in (tmp_path / "out" / "table.md").read_text()


@pytest.mark.e2e
def test_selective_option_equals_the_stitched_runs(toy_dir, tmp_path):
    """hf-knnmoe's selective options turn retrieval off per document: a skipped document's loglikelihoods are the
    stock model's, every other document's kNN-MoE's (the result the runner used to stitch together from two
    finished runs). Equal up to float32 rounding, which moves with the batch a request shares: lm-eval batches
    the skipped and the retrieved requests apart (observed 1 ulp; 2e-6 is 4 float32 ulps of a loglikelihood near -5)."""
    import numpy as np

    from knnmoe_eval.harness.selective import lowest_fraction

    runner = Runner(toy_settings(toy_dir, tmp_path))
    bench = BENCHMARKS["toy_shift"]
    memory, ppl = runner.memory(bench), runner.perplexity(bench)

    def logliks(lm):
        samples = runner._evaluate(lm, bench.test, runner.settings.limit)["samples"][bench.test]
        return np.array([[r[0][0] for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])])

    zero, knn = logliks(runner.base), logliks(runner.knn_lm(memory, k=1))
    assert (np.abs(zero - knn).max(axis=1) > 2e-5).all()  # retrieval moves every document well beyond rounding
    for options, skip in (({"selective_fraction": 1 / 3}, lowest_fraction(ppl, 1 / 3)),
                          ({"selective_ppl": float(np.median(ppl))}, ppl < np.median(ppl))):
        lm = runner.knn_lm(memory, k=1, **options)
        np.testing.assert_allclose(logliks(lm), np.where(skip[:, None], zero, knn), rtol=0, atol=2e-6)
        assert lm.skipped == skip.sum() > 0
    row = runner.selective(bench)  # the runner's Selective row runs the option
    stitched = np.where(lowest_fraction(ppl, 1 / 3), runner.zero_shot(bench)["scores"], runner.knn(bench)["scores"])
    assert row["scores"] == stitched.tolist() and row["selective_skipped"] == 4
