"""The toy domain-shift data, its lm-eval tasks and the cached toy model (a few training steps only)."""

from dataclasses import replace
from pathlib import Path

import pytest

from knnmoe_eval.experiments import toy
from knnmoe_eval.testing import small_toy

SMALL = small_toy()

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks" / "toy"
TOY_TASKS = ("knnmoe_toy_indomain", "knnmoe_toy_shift", "knnmoe_toy_shift_ref")


def task_manager(**metadata):
    from lm_eval.tasks import TaskManager

    # built-in tasks left out: indexing them takes seconds; a YAML of ours that fails to parse is still missed
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return toy.train_or_load(tmp_path_factory.mktemp("toy"), SMALL, progress=False)


def test_splits_are_deterministic_per_seed():
    assert toy.generate_splits(SMALL) == toy.generate_splits(SMALL)
    assert toy.generate_splits(SMALL) != toy.generate_splits(replace(SMALL, seed=1))


def test_splits_are_disjoint_and_sized():
    splits = toy.generate_splits(SMALL)
    texts = [r["text"] for records in splits.values() for r in records]
    assert len(texts) == len(set(texts))
    assert {s: len(r) for s, r in splits.items()} == {
        "train": SMALL.n_train,
        "indomain_test": SMALL.n_indomain_test,
        "shift_ref": SMALL.n_shift_ref,
        "shift_test": SMALL.n_shift_test,
    }


def test_items_follow_their_rules():
    rules = toy.make_rules(SMALL)
    for split, records in toy.generate_splits(SMALL).items():
        for r in records:
            assert r["text"] == r["context"] + r["answer"]
            assert r["choices"][r["gold"]] == r["answer"]
            assert len(set(r["choices"])) == SMALL.n_domains  # the training rules disagree on every symbol
            if split.startswith("shift"):
                assert r["context"][0] == toy.SHIFT_MARKER
                assert r["gold"] == rules.shift_domain(r["query"])
            else:
                assert r["gold"] == rules.markers.index(r["context"][0])


@pytest.mark.parametrize(
    "bad", [dict(n_domains=1), dict(n_experts=6), dict(n_experts=4, top_k=4), dict(min_pairs=3, max_pairs=2)]
)
def test_bad_config_is_refused(bad):
    from knnmoe_eval.errors import KnnMoeError

    with pytest.raises(KnnMoeError):
        toy.ToyConfig(**bad)


def test_pair_shift_answers_by_the_symbol_and_the_one_before():
    """shift=pair (the third toy): every image of a shifted item, context pairs included, follows the rule of
    shift_source[(symbol + previous symbol) mod n], checked from the text itself; the default keys are unchanged."""
    pair = replace(SMALL, shift="pair", n_shift_ref=40)
    assert replace(SMALL, shift="symbol").key() == SMALL.key() != pair.key()
    rules = toy.make_rules(pair)
    symbols = rules.symbols
    depends_on_previous = False
    for r in toy.generate_splits(pair)["shift_ref"]:
        pairs = r["text"].split(": ")[1].split(" ")  # "X: ab cd e" + answer -> ["ab", "cd", "ef"]
        for i, (symbol, image) in enumerate(pairs):
            previous = pairs[i - 1][0] if i else symbol
            domain = rules.shift_source[(symbols.index(symbol) + symbols.index(previous)) % len(symbols)]
            assert image == rules.images[domain][symbols.index(symbol)]
            depends_on_previous |= domain != rules.shift_source[symbols.index(symbol)]
        assert r["gold"] == r["choices"].index(pairs[-1][1])
    assert depends_on_previous
    with pytest.raises(Exception, match="shift must be one of"):
        toy.ToyConfig(shift="marker")


def test_shifted_domain_needs_every_training_rule():
    # a per-symbol mix: no single domain's experts (one constant routing change) can answer it
    assert set(toy.make_rules(SMALL).shift_source) == set(range(SMALL.n_domains))


def test_answer_mask_marks_exactly_the_images(toy_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_dir)
    texts = [r["text"] for r in toy.load_split(toy_dir, "train")[:8]]
    ids = tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]
    mask = toy._answer_mask(texts, ids.shape[1])
    for text, row, keep in zip(texts, ids, mask):
        assert row[0].item() == tokenizer.bos_token_id
        assert tokenizer.decode(row[keep]) == text[4::3]


def test_train_or_load_caches_by_config(toy_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(toy, "train", lambda *a, **k: pytest.fail("retrained a cached toy"))
    assert toy.train_or_load(toy_dir.parent, SMALL) == toy_dir
    assert replace(SMALL, steps=3).key() != SMALL.key()
    model = AutoModelForCausalLM.from_pretrained(toy_dir)
    assert model.config.model_type == "olmoe" and model.config.num_experts == SMALL.n_experts
    assert [len(toy.load_split(toy_dir, s)) for s in toy.TOY_SPLITS] == [
        SMALL.n_train,
        SMALL.n_indomain_test,
        SMALL.n_shift_ref,
        SMALL.n_shift_test,
    ]


def test_training_is_deterministic_at_any_thread_count():
    import torch

    texts = [r["text"] for r in toy.generate_splits(SMALL)["train"]]
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):  # as under OMP_NUM_THREADS=1 and 2
            torch.set_num_threads(n)
            runs.append(toy.train(SMALL, texts, progress=False))
            assert torch.get_num_threads() == n  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    (first, _, loss_a), (second, _, loss_b) = runs
    assert loss_a == loss_b
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_tasks_are_indexed_and_count_docs(toy_dir):
    manager = task_manager(toy_dir=str(toy_dir))
    assert set(TOY_TASKS) <= set(manager.all_tasks)
    tasks = manager.load(list(TOY_TASKS))["tasks"]
    counts = {name: len(list(task.test_docs())) for name, task in tasks.items()}
    assert counts == {
        "knnmoe_toy_indomain": SMALL.n_indomain_test,
        "knnmoe_toy_shift": SMALL.n_shift_test,
        "knnmoe_toy_shift_ref": SMALL.n_shift_ref,
    }
    ref = tasks["knnmoe_toy_shift_ref"]
    doc = next(iter(ref.test_docs()))
    assert ref.config.output_type == "loglikelihood"
    assert ref.doc_to_text(doc) + ref.doc_to_target(doc) == doc["text"]


def test_tags_select_the_test_tasks(toy_dir):
    manager = task_manager(toy_dir=str(toy_dir))
    assert {"knnmoe_toy", "knnmoe_toy_ref"} <= set(manager.all_tags)
    assert set(manager.load("knnmoe_toy")["tasks"]) == {"knnmoe_toy_indomain", "knnmoe_toy_shift"}


@pytest.mark.e2e
def test_lm_eval_finds_data_through_pretrained(toy_dir):
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={toy_dir},dtype=float32",
        tasks=["knnmoe_toy_shift", "knnmoe_toy_shift_ref"],
        device="cpu",
        batch_size=4,
        limit=4,
        bootstrap_iters=0,
        # what the CLI does: model_args join the metadata, so pretrained=<toy dir> alone locates the data
        task_manager=task_manager(pretrained=str(toy_dir)),
    )
    # the documents lm-eval scored are this toy directory's own splits, in order
    for task, split in (("knnmoe_toy_shift", "shift_test"), ("knnmoe_toy_shift_ref", "shift_ref")):
        records = toy.load_split(toy_dir, split)
        assert out["n-samples"][task] == {"original": len(records), "effective": 4}
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc"]["id"] for s in samples] == [r["id"] for r in records[:4]]


def test_missing_toy_dir_says_how_to_pass_it(tmp_path):
    with pytest.raises(ValueError, match="toy_dir"):
        toy.find_toy_dir(toy_dir=str(tmp_path), pretrained="allenai/OLMoE-1B-7B-0125")
