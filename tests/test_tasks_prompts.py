"""Task YAMLs through lm-eval's TaskManager: all indexed, all buildable, prompts and targets rendered exactly."""

from pathlib import Path

import pytest
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from knnmoe_eval.benchmarks import data as B

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tasks"
DATA = ROOT / "tests" / "fixtures" / "data"
OURS = sorted(p for bench in B.BENCHMARK_SPLITS for p in (TASKS / bench).glob("*.yaml")) + sorted(TASKS.glob("*.yaml"))
KINDS = ("", "_gen", "_5shot", "_ref")
INSTRUCTION = "Answer the following multiple-choice question with the letter of the correct option.\n\n"


@pytest.fixture(scope="module")
def manager():
    # lm-eval's own thousands of YAMLs left out: indexing them takes half a minute (see the e2e test below)
    return TaskManager(include_path=str(TASKS), include_defaults=False, metadata={"data_dir": str(DATA)})


@pytest.fixture(scope="module")
def tasks(manager):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNNMOE_FEWSHOT_ENCODER", "tfidf")
        mp.setenv("HF_ALLOW_CODE_EVAL", "1")
        names = [f"knnmoe_{bench}{kind}" for bench in B.BENCHMARK_SPLITS for kind in KINDS]
        yield manager.load(names)["tasks"]


def context(task, doc):
    return task.fewshot_context(doc, task.config.num_fewshot or 0)


def assert_ours_are_indexed(manager):
    # lm-eval skips a YAML that fails to parse without a word: each of ours must come back under its own name.
    assert len(OURS) == 6 * 4 + 5 + 4
    for path in OURS:
        cfg = load_yaml(path, resolve_func=False)
        name = cfg.get("group") or cfg["task"]
        assert name in manager.task_index, path
        assert Path(manager.task_index[name].yaml_path).resolve() == path.resolve()
        assert "tag" in cfg or "group" in cfg, f"{path}: set tag explicitly (include: inherits it)"


def test_every_yaml_is_indexed(manager):
    assert_ours_are_indexed(manager)


@pytest.mark.e2e
def test_standard_tasks_still_come_from_lm_eval():
    manager = TaskManager(include_path=str(TASKS), metadata={"data_dir": str(DATA)})
    assert_ours_are_indexed(manager)  # no name of ours is shadowed by, or shadows, one of lm-eval's
    for name in ("mmlu", "medmcqa", "gpqa_diamond_zeroshot", "gpqa_main_n_shot", "mbpp", "medqa_4options"):
        assert "site-packages/lm_eval/tasks" in str(manager.task_index[name].yaml_path)


@pytest.mark.parametrize("bench", B.BENCHMARK_SPLITS)
def test_each_benchmark_has_four_kinds_with_the_fixture_sizes(tasks, bench):
    n_test, n_ref = {"gpqa": (3, 6), "mmlu": (4, 8), "supergpqa": (16, 2), "medqa": (3, 6), "medmcqa": (3, 5), "mbpp": (4, 6)}[bench]
    sizes = {kind: len(tasks[f"knnmoe_{bench}{kind}"].eval_docs) for kind in KINDS}
    assert sizes == {"": n_test, "_gen": n_test, "_5shot": n_test, "_ref": n_ref}
    assert len(tasks[f"knnmoe_{bench}_5shot"].sampler.fewshot_docs()) == n_ref


def test_zero_shot_prompt_and_gold_letter(tasks):
    expected = (
        INSTRUCTION + "Question: Which planet is closest to the Sun?\nOptions:\nA. Venus\nB. Earth\nC. Mercury\nD. Mars\n"
        "Answer:"
    )
    for name in ("knnmoe_mmlu", "knnmoe_mmlu_gen"):
        task = tasks[name]
        assert context(task, task.eval_docs[1]) == expected
    mc = tasks["knnmoe_mmlu"]
    assert mc.doc_to_choice(mc.eval_docs[1]) == ["A", "B", "C", "D"] and mc.doc_to_target(mc.eval_docs[1]) == 2
    assert tasks["knnmoe_mmlu_gen"].doc_to_target(mc.eval_docs[1]) == "C"
    requests = mc.construct_requests(mc.eval_docs[1], expected)
    assert [r.arguments for r in requests] == [(expected, f" {letter}") for letter in "ABCD"]


def test_options_follow_the_items_count(tasks):
    task = tasks["knnmoe_supergpqa"]
    doc = next(d for d in task.eval_docs if d["id"] == "sg07")
    assert context(task, doc).endswith("I. Nitrogen\nJ. Argon\nAnswer:")
    assert task.doc_to_choice(doc) == list("ABCDEFGHIJ")


def test_build_task_targets_the_gold_answer(tasks):
    ref = tasks["knnmoe_medqa_ref"]
    doc = next(d for d in ref.eval_docs if d["id"] == "train-1")
    (request,) = ref.construct_requests(doc, context(ref, doc))  # the gold answer as the one choice
    assert request.arguments == (
        INSTRUCTION + "Question: A 6-year-old girl has a barking cough. What is the most likely pathogen?\nOptions:\n"
        "A. Rhinovirus\nB. Parainfluenza virus\nC. Adenovirus\nD. Influenza B\nAnswer:",
        " B",
    )
    mbpp = tasks["knnmoe_mbpp_ref"]
    doc = next(d for d in mbpp.eval_docs if d["id"] == "603")
    request = mbpp.construct_requests(doc, context(mbpp, doc))
    assert request.arguments[0].endswith('assert strip_ends("xyz") == "y"\n[BEGIN]\n')
    assert request.arguments[1] == "def strip_ends(s):\r\n    return s[1:-1]\n[DONE]"


def test_five_shot_prompt_has_the_most_similar_references_most_similar_last(tasks):
    task = tasks["knnmoe_mmlu_5shot"]
    prompt = context(task, task.eval_docs[0])  # "What is the derivative of x^2?"
    shots = prompt[len(INSTRUCTION):].split("\n\n")
    assert len(shots) == 6 and prompt.startswith(INSTRUCTION)
    assert shots[-2] == "Question: What is the derivative of x^3?\nOptions:\nA. 3x^2\nB. x^2\nC. 3x\nD. x^3\nAnswer: A"
    assert shots[-1] == "Question: What is the derivative of x^2?\nOptions:\nA. 2x\nB. x\nC. x^2\nD. 2\nAnswer:"
    reference_questions = {d["question"] for d in task.sampler.fewshot_docs()}
    assert all(shot.split("\n")[0].removeprefix("Question: ") in reference_questions for shot in shots[:-1])


@pytest.mark.parametrize(
    ("response", "n_options", "letter"),
    [
        ("B", 4, "B"),
        (" (C) Mercury", 4, "C"),
        ("The answer is D.", 4, "D"),
        ("Answer: **A**", 4, "A"),
        ("A and B look plausible, but the answer is C", 4, "C"),
        ("J", 10, "J"),
        ("J", 4, None),
        ("I think so", 4, None),
        ("A 45-year-old man is most likely to have B.", 4, "B"),
        ("**C**", 4, "C"),
        ("The correct option is C", 4, "C"),
        ("C is the most likely option.", 4, None),  # a bare letter mid-sentence is not read as a label
        ("the answer is a tumour", 4, None),
        ("", 4, None),
    ],
)
def test_one_answer_parsing_rule(response, n_options, letter):
    assert B.parse_answer(response, n_options) == letter


def test_generation_scoring_uses_the_rule(tasks):
    task = tasks["knnmoe_mmlu_gen"]
    doc = task.eval_docs[1]
    assert task.process_results(doc, ["The answer is C."]) == {"acc": 1}
    assert task.process_results(doc, ["The answer is B."]) == {"acc": 0}
