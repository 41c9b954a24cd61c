"""The paper's six benchmarks, each cut into a disjoint test set and a reference set that every method shares.

kNN-MoE builds its memory from the reference set, the 5-shot baseline retrieves its examples from it and SFT
trains on it, so the cut must be a pure function of the data files and one seed: this module is that function.
It also holds what the paper keeps identical across methods: the rendering of a question and its options in
the zero-shot prompt (Appendix A.1), the gold targets and one answer-parsing rule. The YAML tasks under `tasks/`
reach it through `custom_dataset: !function knnmoe_eval.benchmarks.data.load`, which receives `--metadata`.

Every random choice (GPQA option order, test and reference subsets) hashes a record id with the seed, so it is
the same in every process, on every access and whatever order the rows arrive in; subsets are prefixes of one
seeded ranking, hence nested: the N = 1000 reference set is contained in the N = 5000 one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from knnmoe_eval.errors import KnnMoeError

SEED = 1234
LETTERS = "ABCDEFGHIJ"  # SuperGPQA items have up to ten options


@dataclass(frozen=True)
class Split:
    """Where a benchmark's test and reference sets come from, and their sizes (see docs/tasks.md)."""

    hub_id: str
    hub_config: str | None
    test: tuple[str, ...]  # source splits of the test set
    reference: tuple[str, ...]  # source splits of the reference candidates; () = held out of `test`
    test_size: int | None = None  # seeded subset of the test candidates; None keeps all
    ref_size: int | None = None  # default reference size N; None keeps all candidates
    reference_share: float = 0.0  # single-file benchmarks: seeded share of rows held out as reference
    splits_are_configs: bool = False  # GPQA: each source split is a hub config holding one "train" split
    multiple_choice: bool = True  # False: generative only (MBPP), no loglikelihood test or _ref_mc task


BENCHMARK_SPLITS = {
    "gpqa": Split("Idavidrein/gpqa", None, ("gpqa_diamond",), ("gpqa_main",), splits_are_configs=True),
    "mmlu": Split("cais/mmlu", "all", ("test",), ("auxiliary_train",), ref_size=10_000),
    "supergpqa": Split("m-a-p/SuperGPQA", None, ("train",), (), reference_share=3_000 / 26_529),
    "medqa": Split("GBaker/MedQA-USMLE-4-options-hf", None, ("test",), ("train",), test_size=1_073),
    # the whole train split: the paper's OLMoE cost tables (12.79 GB exact, 16 layers, 4,352 B per key) hold
    # about 183k keys per layer, i.e. all 182,822 train questions at one answer token each (docs/tasks.md)
    "medmcqa": Split("openlifescienceai/medmcqa", None, ("validation",), ("train",)),
    "mbpp": Split("google-research-datasets/mbpp", "full", ("prompt", "test", "validation"), ("train",),
                  multiple_choice=False),
}


def _rank_key(seed: int, salt: str, record_id: str) -> bytes:
    return hashlib.sha256(f"{seed}/{salt}/{record_id}".encode()).digest()


def ranked(docs: list[dict], salt: str, seed: int = SEED) -> list[dict]:
    """`docs` in a seeded order that depends on their ids only: any prefix is a seeded random subset."""
    return sorted(docs, key=lambda d: _rank_key(seed, salt, d["id"]))


def shuffled_options(record_id: str, correct: str, incorrect: list[str], seed: int = SEED) -> tuple[list[str], int]:
    """GPQA's options in an order fixed by (seed, record id): the gold letter never moves between accesses."""
    options = [correct, *incorrect]
    order = sorted(range(len(options)), key=lambda i: _rank_key(seed, f"options/{record_id}", str(i)))
    return [options[i] for i in order], order.index(0)


# Raw rows in each hub schema -> one doc schema: id, question, choices, answer (gold index), subject.
def _gpqa(row, split, index, seed):
    clean = [" ".join(row[k].split()) for k in ("Correct Answer", *(f"Incorrect Answer {i}" for i in (1, 2, 3)))]
    choices, answer = shuffled_options(row["Record ID"], clean[0], clean[1:], seed)
    return dict(id=row["Record ID"], question=row["Question"].strip(), choices=choices, answer=answer,
                subject=row.get("Subdomain") or "")


def _mmlu(row, split, index, seed):
    return dict(id=f"{split}-{index}", question=row["question"].strip(), choices=list(row["choices"]),
                answer=int(row["answer"]), subject=row.get("subject") or "")


def _supergpqa(row, split, index, seed):
    answer = LETTERS.index(row["answer_letter"])
    if row["options"][answer] != row["answer"]:
        raise KnnMoeError(f"SuperGPQA {row['uuid']}: answer_letter {row['answer_letter']} is not the answer text")
    return dict(id=row["uuid"], question=row["question"].strip(), choices=list(row["options"]), answer=answer,
                subject=row.get("field") or "")


def _medqa(row, split, index, seed):
    return dict(id=f"{split}-{index}", question=row["sent1"].strip(), choices=[row[f"ending{i}"] for i in range(4)],
                answer=int(row["label"]), subject="")


def _medmcqa(row, split, index, seed):
    choices = [row[k] for k in ("opa", "opb", "opc", "opd")]
    return dict(id=row["id"], question=row["question"].strip(), choices=choices, answer=int(row["cop"]),
                subject=row.get("subject_name") or "")


def _mbpp(row, split, index, seed):
    return dict(id=str(row["task_id"]), question=row["text"].strip(), code=row["code"],
                test_list=list(row["test_list"]), test_setup_code=row.get("test_setup_code") or "")


_NORMALIZE = dict(gpqa=_gpqa, mmlu=_mmlu, supergpqa=_supergpqa, medqa=_medqa, medmcqa=_medmcqa, mbpp=_mbpp)


def local_path(data_dir: str | os.PathLike, benchmark: str, split: str) -> Path:
    return Path(data_dir).expanduser() / benchmark / f"{split}.jsonl"


def _read_rows(benchmark: str, split: str, data_dir) -> list[dict]:
    spec = BENCHMARK_SPLITS[benchmark]
    if data_dir is not None:
        path = local_path(data_dir, benchmark, split)
        if not path.is_file():
            raise KnnMoeError(
                f"{benchmark}: missing {path}. Expected DATA_DIR/<benchmark>/<split>.jsonl in the schema of "
                f"{spec.hub_id}; {benchmark} needs {', '.join(f'{s}.jsonl' for s in spec.test + spec.reference)} "
                f"under {path.parent}"
            )
        with path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    import datasets

    name, hub_split = (split, "train") if spec.splits_are_configs else (spec.hub_config, split)
    try:
        return list(datasets.load_dataset(spec.hub_id, name, split=hub_split))
    except Exception as err:
        raise KnnMoeError(
            f"{benchmark}: could not load {spec.hub_id} ({name or 'default'}, {hub_split}) from the hub ({err}). "
            f"Offline, pass --metadata data_dir=DIR with {local_path('DIR', benchmark, split)}"
        ) from err


def _docs(benchmark: str, splits: tuple[str, ...], data_dir, seed: int) -> list[dict]:
    normalize = _NORMALIZE[benchmark]
    return [
        normalize(row, split, i, seed)
        for split in splits
        for i, row in enumerate(_read_rows(benchmark, split, data_dir))
    ]


def _text_key(doc: dict) -> str:
    return " ".join(doc["question"].lower().split())


def split_sets(
    benchmark: str,
    *,
    data_dir=None,
    ref_size: int | None = None,
    seed: int = SEED,
    with_reference: bool = True,
) -> tuple[list[dict], list[dict]]:
    """(test set in source order, reference set in seeded order: its first N items are the size-N subset)."""
    if benchmark not in BENCHMARK_SPLITS:
        raise KnnMoeError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARK_SPLITS)}")
    spec = BENCHMARK_SPLITS[benchmark]
    test = _docs(benchmark, spec.test, data_dir, seed)
    if spec.reference:
        candidates = _docs(benchmark, spec.reference, data_dir, seed) if with_reference else []
    else:
        held_out = ranked(test, "reference", seed)[: round(len(test) * spec.reference_share)]
        held_ids = {d["id"] for d in held_out}
        test, candidates = [d for d in test if d["id"] not in held_ids], held_out
    # Any question of the test source (even one left out of a test subset) stays out of the reference set.
    test_ids, test_texts = {d["id"] for d in test}, {_text_key(d) for d in test}
    if spec.test_size is not None:
        kept = {d["id"] for d in ranked(test, "test", seed)[: spec.test_size]}
        test = [d for d in test if d["id"] in kept]
    if not with_reference:
        return test, []
    unseen = [d for d in candidates if d["id"] not in test_ids and _text_key(d) not in test_texts]
    pool = ranked(unseen, "reference", seed)
    if ref_size is None:  # the default size is a cap: smaller files (fixtures, partial downloads) give all they have
        return test, pool[: spec.ref_size]
    if not 0 < ref_size <= len(pool):
        raise KnnMoeError(f"{benchmark}: ref_size={ref_size} is outside 1..{len(pool)}, the reference candidates")
    return test, pool[:ref_size]


def load(benchmark: str, part: str, data_dir=None, ref_size=None, split_seed=SEED, runs_code=False, **_metadata):
    """lm-eval `custom_dataset`: a DatasetDict with one split named `part`.

    part: "test", "reference", or "pool" (both, told apart by the `role` column; the similarity 5-shot sampler
    sees the test doc only when the few-shot split is the test split, so both must live in one split).
    runs_code (set by the MBPP generative YAMLs) checks the code-execution opt-in before any generation.
    `_metadata` swallows the rest of `--metadata` and the model_args that lm-eval merges into it.
    """
    import datasets

    if part not in ("test", "reference", "pool"):
        raise KnnMoeError(f"part must be test, reference or pool, not {part!r}")
    if runs_code:
        from knnmoe_eval.benchmarks.code_exec import require_opt_in

        require_opt_in()
    test, reference = split_sets(
        benchmark,
        data_dir=data_dir,
        ref_size=None if ref_size is None else int(ref_size),
        seed=int(split_seed),
        with_reference=part != "test",
    )
    docs = {"test": [dict(d, role="test") for d in test], "reference": [dict(d, role="reference") for d in reference]}
    spec = BENCHMARK_SPLITS[benchmark]
    for name, needed in (("test", part in ("test", "pool")), ("reference", part in ("reference", "pool"))):
        if needed and not docs[name]:  # refused here, before lm-eval's samplers or datasets trip over it
            files = spec.test if name == "test" else (spec.reference or spec.test)
            where = (f"check {', '.join(str(local_path(data_dir, benchmark, f)) for f in files)}" if data_dir
                     else f"check the {spec.hub_id} download")
            why = {"pool": ", and the 5-shot prompts draw their examples from it",
                   "reference": ": a memory is built from it"}.get(part, "") if name == "reference" else ""
            raise KnnMoeError(f"{benchmark}: the {name} set is empty{why}; {where}")
    rows = docs["test"] + docs["reference"] if part == "pool" else docs[part]
    return datasets.DatasetDict({part: datasets.Dataset.from_list(rows)})


def test_docs(dataset):
    return dataset.filter(lambda d: d["role"] == "test")


def reference_docs(dataset):
    return dataset.filter(lambda d: d["role"] == "reference")


# Prompts and targets: one rendering for the loglikelihood, generative, 5-shot and build tasks. Appendix A.1's
# wording did not survive the paper's text export; we keep its stated shape: {question}, then {choices} as one
# lettered line per option of the item. The instruction line is the tasks' `description` (tasks/_templates).
def options_block(choices: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def doc_to_text(doc: dict) -> str:
    return f"Question: {doc['question']}\nOptions:\n{options_block(doc['choices'])}\nAnswer:"


def doc_to_choice(doc: dict) -> list[str]:
    return list(LETTERS[: len(doc["choices"])])


def doc_to_target(doc: dict) -> str:
    return LETTERS[doc["answer"]]


_STATED = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*[:\-]?\s*\(?\**\s*([A-J])\b")
# A letter as an option label: "(C)", "C.", "C)", "C:", "**C**" or last on its line; not "A" in "A 45-year-old".
_LABEL = re.compile(r"(?<![A-Za-z0-9])(?:\(([A-J])\)|([A-J])(?=[.:)*]|[ \t]*$))", re.MULTILINE)
# Reasoning models' output: gpt-oss's harmony channels, with the special tokens kept or skipped at decoding
# (`<|channel|>final<|message|>` reads "assistantfinal" once they are dropped), and Qwen3's <think> block.
_HARMONY_FINAL = re.compile(r"<\|channel\|>final(?:\s*<\|constrain\|>\w*)?<\|message\|>|(?<![A-Za-z])assistantfinal")
_HARMONY_END = re.compile(r"<\|(?:end|return|call)\|>")
_HARMONY_OPEN = re.compile(r"\A\s*(?:<\|channel\|>analysis<\|message\|>|analysis(?=[A-Z*#]))")


def final_answer(response: str) -> str:
    """The part of a generation that answers: after Qwen3's </think> or in gpt-oss's `final` channel; "" when
    a reasoning block never closed (the generation stopped mid-thought), so that no letter of the reasoning
    is read as the answer. A generation with neither is its own answer."""
    if "<think>" in response or "</think>" in response:
        head, sep, tail = response.rpartition("</think>")
        return tail if sep else ""
    finals = list(_HARMONY_FINAL.finditer(response))
    if finals:
        tail = response[finals[-1].end():]
        return _HARMONY_END.split(tail, maxsplit=1)[0]
    if "<|channel|>" in response or _HARMONY_OPEN.match(response):
        return ""  # analysis (or commentary) only
    return response


def _option_named(response: str, choices: list[str]) -> str | None:
    """The letter of the one option whose text the answer states ("The answer is Mercury.")."""
    text = " ".join(response.lower().split())
    named = [i for i, c in enumerate(choices) if c.strip() and
             re.search(r"(?<!\w)" + re.escape(" ".join(c.lower().split())) + r"(?!\w)", text)]
    # an option contained in another ("virus" in "Parainfluenza virus") is named only through the longer one
    named = [i for i in named if not any(j != i and choices[i].lower() in choices[j].lower() for j in named)]
    return LETTERS[named[0]] if len(named) == 1 else None


def parse_answer(response: str, n_options: int, choices: list[str] | None = None) -> str | None:
    """The one answer-parsing rule of every method: in the final answer (`final_answer`), the last "answer (is):
    X", else the first option label, else (given the options' `choices`) the one option named by its text.

    Only letters of the item's own options count ("I" is no answer to a four-option question).
    """
    response = final_answer(response)
    valid = LETTERS[:n_options]
    stated = [m.group(1) for m in _STATED.finditer(response) if m.group(1) in valid]
    if stated:
        return stated[-1]
    labels = [m.group(1) or m.group(2) for m in _LABEL.finditer(response)]
    letter = next((letter for letter in labels if letter in valid), None)
    if letter is None and choices:
        letter = _option_named(response, choices)
    return letter


def process_generation(doc: dict, results: list[str]) -> dict[str, int]:
    return {"acc": int(parse_answer(results[0], len(doc["choices"]), doc["choices"]) == doc_to_target(doc))}


def gold_choice(doc: dict) -> list[str]:
    """The build tasks' one choice: the gold letter, which lm-eval delimits as it does the test task's choices."""
    return [doc_to_target(doc)]


def gold_continuation(doc: dict) -> str:
    """The gold answer as it follows the plain prompt (" B", or MBPP's program): the bits-per-byte denominator."""
    return mbpp_doc_to_target(doc) if "code" in doc else " " + doc_to_target(doc)


def gold_bits_per_byte(doc: dict, results: list[tuple[float, bool]]) -> dict[str, tuple[float, int]]:
    """Likelihood tasks: bits per byte of the gold answer. lm-eval's `perplexity` exponentiates the summed
    loglikelihood of a whole target, which overflows on a program."""
    loglikelihood, _ = results[0]
    return {"bits_per_byte": (loglikelihood, len(gold_continuation(doc).encode("utf-8")))}


# MBPP: lm-eval's own prompt shape, the gold code as the target of few-shot examples and of the build task.
def mbpp_doc_to_text(doc: dict) -> str:
    tests = "\n".join(doc["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {doc['question']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def mbpp_doc_to_target(doc: dict) -> str:
    return f"{doc['code']}\n[DONE]"


def extract_code(response: str) -> str:
    """The program in a completion: the first fenced block if there is one, else the text before [DONE]."""
    fenced = re.search(r"```(?:[Pp]ython3?)?\s*\n(.*?)(?:```|$)", response, re.DOTALL)
    return fenced.group(1) if fenced else response.split("[DONE]")[0]


def mbpp_process_generation(doc: dict, results: list[str]) -> dict[str, int]:
    from knnmoe_eval.benchmarks.code_exec import passes

    passed = int(passes(extract_code(results[0]), doc["test_list"], setup=doc["test_setup_code"]))
    # pass@1 with one greedy sample per problem; also reported as `acc` so that the group "Avg." concatenates it
    # with the multiple-choice accuracies, as the paper does.
    return {"pass@1": passed, "acc": passed}
