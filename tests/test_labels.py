"""Pseudo-labelled memory builds: the `_ref_mc` views, the labeller, and `hf-knnmoe mode=build,labels=FILE`."""

import json
from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks import TaskManager
from safetensors.torch import load_file

from knnmoe_eval import KnnMoeError, KnnMoeOptions
from knnmoe_eval.experiments import toy
from knnmoe_eval.harness.labels import make_labels, read_labels, ref_task_name, summary_path

ROOT = Path(__file__).resolve().parents[1]
TASKS, TOY_TASKS, DATA = ROOT / "tasks", ROOT / "tasks" / "toy", ROOT / "tests" / "fixtures" / "data"
BENCHES = ("gpqa", "mmlu", "supergpqa", "medqa", "medmcqa")  # mbpp is generative: no choices to pick from
CONFIG = toy.ToyConfig(n_train=64, n_indomain_test=4, n_shift_ref=12, n_shift_test=4, steps=2, batch_size=8)
REF, MC = "knnmoe_toy_shift_ref", "knnmoe_toy_shift_ref_mc"


def requests_by_doc(task) -> dict[int, list[tuple[str, str]]]:
    """lm-eval's own requests of a task (what any model is asked), per doc, in choice order."""
    task.build_all_requests()
    by_doc = {}
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        by_doc.setdefault(inst.doc_id, []).append(inst.args)
    return by_doc


def assert_views_agree(ref_task, mc_task):
    ref, mc = requests_by_doc(ref_task), requests_by_doc(mc_task)
    assert sorted(ref) == sorted(mc) == list(range(len(ref))) and ref
    for doc_id, doc in zip(sorted(mc), mc_task.eval_docs):
        gold = mc_task.doc_to_target(doc)
        assert ref[doc_id] == [mc[doc_id][gold]], doc_id


@pytest.fixture(scope="module")
def bench_tasks():
    manager = TaskManager(include_path=str(TASKS), include_defaults=False, metadata={"data_dir": str(DATA)})
    return manager.load([f"knnmoe_{b}_ref{kind}" for b in BENCHES for kind in ("", "_mc")])["tasks"]


@pytest.mark.parametrize("bench", BENCHES)
def test_ref_requests_are_the_mc_requests_gold_choice(bench_tasks, bench):
    assert_views_agree(bench_tasks[f"knnmoe_{bench}_ref"], bench_tasks[f"knnmoe_{bench}_ref_mc"])


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return toy.train_or_load(tmp_path_factory.mktemp("toy"), CONFIG, progress=False)


@pytest.fixture(scope="module")
def manager(toy_dir):
    return TaskManager(include_path=str(TOY_TASKS), include_defaults=False, metadata={"toy_dir": str(toy_dir)})


def test_toy_ref_requests_are_the_mc_requests_gold_choice(manager):
    tasks = manager.load([REF, MC])["tasks"]
    assert_views_agree(tasks[REF], tasks[MC])


def build(manager, toy_dir, memory, labels=None, **kw):
    extra = f",labels={labels}" if labels else ""
    return lm_eval.simple_evaluate(
        model="hf-knnmoe", model_args=f"pretrained={toy_dir},dtype=float32,mode=build,memory={memory},eta=100{extra}",
        tasks=[REF], task_manager=manager, batch_size=4, device="cpu", bootstrap_iters=0, **kw,
    )


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def self_labels(toy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "self.jsonl"
    summary = make_labels("hf", f"pretrained={toy_dir},dtype=float32", [MC], out, include_path=str(TOY_TASKS),
                          batch_size=4, device="cpu")
    return out, summary


@pytest.fixture(scope="module")
def gold_memory(manager, toy_dir, tmp_path_factory):
    mem = tmp_path_factory.mktemp("gold") / "mem"
    build(manager, toy_dir, mem)
    return mem


@pytest.mark.e2e  # labels and builds through lm-eval on the toy
def test_labeller_writes_one_label_per_doc_and_its_agreement_is_lm_eval_acc(self_labels, toy_dir, manager):
    out, summary = self_labels
    records = read_jsonl(out)
    docs = toy.load_split(toy_dir, "shift_ref")
    assert [r["doc_id"] for r in records] == list(range(CONFIG.n_shift_ref))
    for r, doc in zip(records, docs):
        assert r["task"] == REF and r["labeller"] == f"hf pretrained={toy_dir},dtype=float32"
        assert (r["context"], r["continuation"]) == (doc["context"], doc["choices"][r["choice"]])
        assert r["gold"] == doc["gold"] and r["gold_agrees"] == (r["choice"] == doc["gold"])
    acc = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={toy_dir},dtype=float32", tasks=[MC],
                                  task_manager=manager, batch_size=4, device="cpu",
                                  bootstrap_iters=0)["results"][MC]["acc,none"]
    agrees = sum(r["gold_agrees"] for r in records)
    assert summary["tasks"][REF]["gold_agrees"] == agrees == round(acc * CONFIG.n_shift_ref)
    assert summary["tasks"][REF]["agreement"] == acc
    assert json.loads(summary_path(out).read_text()) == summary
    # the barely trained toy is a poor labeller: the build test below sees both agreeing and disagreeing labels
    assert 0 < agrees < CONFIG.n_shift_ref


@pytest.mark.e2e
def test_labeller_takes_an_already_loaded_model(self_labels, toy_dir, manager, tmp_path):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(toy_dir), dtype="float32", batch_size=4, device="cpu")
    out = tmp_path / "loaded.jsonl"
    make_labels(lm, None, MC, out, task_manager=manager)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "labeller"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(out)) == strip(read_jsonl(self_labels[0]))
    assert read_jsonl(out)[0]["labeller"] == f"HFLM {toy_dir}"


def layer_files(memory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(memory.glob("layer_*.safetensors"))}


@pytest.mark.e2e
def test_gold_labels_build_is_bit_identical_to_the_gold_build(manager, toy_dir, gold_memory, tmp_path):
    labels = tmp_path / "gold.jsonl"
    summary = make_labels("gold", None, [MC], labels, task_manager=manager)
    assert summary["tasks"][REF]["gold_agrees"] == CONFIG.n_shift_ref
    build(manager, toy_dir, tmp_path / "mem", labels)
    assert layer_files(tmp_path / "mem") == layer_files(gold_memory) != {}
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    assert manifest["build"]["labels"] == {"sha256": summary["sha256"], "labellers": ["gold"]}
    assert json.loads((gold_memory / "manifest.json").read_text())["build"]["labels"] is None


@pytest.mark.e2e
def test_self_labels_change_exactly_the_values_of_disagreeing_docs(manager, toy_dir, gold_memory, self_labels,
                                                                   tmp_path):
    out, _ = self_labels
    build(manager, toy_dir, tmp_path / "mem", out)
    agrees = [r["gold_agrees"] for r in read_jsonl(out)]
    for name in layer_files(gold_memory):
        gold, pseudo = load_file(gold_memory / name), load_file(tmp_path / "mem" / name)
        # one stored position per doc (the toy's answer is one token), in doc order; its key is the context's
        assert gold["keys"].shape[0] == len(agrees)
        assert (gold["keys"] == pseudo["keys"]).all()
        same = (gold["values"] == pseudo["values"]).all(-1).tolist()
        assert same == agrees


@pytest.mark.e2e
def test_missing_label_is_an_error_not_a_gold_fallback(manager, toy_dir, self_labels, tmp_path):
    lines = Path(self_labels[0]).read_text().splitlines()
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    with pytest.raises(KnnMoeError, match=f"no label for {REF} doc 3; .*{MC}"):
        build(manager, toy_dir, tmp_path / "mem", partial)
    assert not (tmp_path / "mem" / "manifest.json").exists()


@pytest.mark.e2e
def test_label_made_on_another_context_is_refused(manager, toy_dir, self_labels, tmp_path):
    records = read_jsonl(self_labels[0])
    records[5]["context"] = "#" + records[5]["context"][1:]
    moved = tmp_path / "moved.jsonl"
    moved.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(KnnMoeError, match=f"label of {REF} doc 5 was made on another context .*character 0"):
        build(manager, toy_dir, tmp_path / "mem", moved)


def test_bad_labels_input_is_refused(tmp_path):
    with pytest.raises(KnnMoeError, match="labelling task"):
        ref_task_name("knnmoe_toy_shift_ref")
    labels = tmp_path / "labels.jsonl"
    labels.write_text("")
    with pytest.raises(KnnMoeError, match="mode=build only"):
        KnnMoeOptions(memory="m", labels=str(labels))
    with pytest.raises(KnnMoeError, match="no such file"):
        KnnMoeOptions(memory="m", mode="build", labels=str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "t", "doc_id": 0}\n')
    with pytest.raises(KnnMoeError, match="line 1: not a label"):
        read_labels(bad)
    twice = tmp_path / "twice.jsonl"
    first = {"task": "t", "doc_id": 0, "context": "c", "continuation": " A"}
    twice.write_text(json.dumps(first) + "\n" + json.dumps({**first, "continuation": " B"}) + "\n")
    with pytest.raises(KnnMoeError, match="line 2: a second, different label for t doc 0"):
        read_labels(twice)
