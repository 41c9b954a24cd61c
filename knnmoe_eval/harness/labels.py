"""Pseudo-labels: build a memory from reference items whose answers come from a model, not from gold.

The paper builds its memory from gold answers and names unlabelled reference sets with LLM-judge labels as
future work. Here any lm-eval model answers the reference set in the test task's multiple-choice format (the
`<ref task>_mc` tasks, same docs in the same order as the `<ref task>` build task); its pick per item (argmax
loglikelihood, the rule of lm-eval's `acc`) becomes that item's continuation. The model itself gives
self-labels, any other model (or `hf-knnmoe` with a memory) is a judge. `hf-knnmoe mode=build,labels=FILE` then
teacher-forces those continuations instead of the gold ones (`requests.reference_sequences`).

One JSON line per reference item:

    {"task": "<ref task>", "doc_id": 3, "context": ..., "continuation": " B", "choice": 1, "gold": 2,
     "gold_agrees": false, "choice_norm": 1, "labeller": "hf pretrained=..."}

`context` is lm-eval's rendered context of the item: a build refuses a label whose context differs from its own
request's (another prompt, chat template or few-shot setting), so labels never silently attach to other text.

    python -m knnmoe_eval.harness.labels --model hf --model_args pretrained=J --tasks knnmoe_toy_shift_ref_mc \
        --include_path tasks/toy --out labels.jsonl
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KnnMoeError

MC_SUFFIX = "_mc"
GOLD = "gold"  # the labeller name of labels copied from the gold answers (a control: builds the gold memory)


@dataclass(frozen=True)
class Label:
    context: str
    continuation: str


def ref_task_name(mc_task: str) -> str:
    """`knnmoe_x_ref_mc` -> `knnmoe_x_ref`: the build task whose requests the labels replace."""
    if not mc_task.endswith(MC_SUFFIX):
        raise KnnMoeError(
            f"task {mc_task!r} is not a labelling task: label the multiple-choice view of a build task, named "
            f"'<build task>{MC_SUFFIX}' (e.g. knnmoe_medmcqa_ref_mc, knnmoe_toy_shift_ref_mc)"
        )
    return mc_task[: -len(MC_SUFFIX)]


def _gold_index(target: Any, choices: list[str]) -> int | None:
    """lm-eval's reading of a multiple-choice target (an index, or a choice's text); None when there is none."""
    if isinstance(target, bool) or isinstance(target, list):
        return None
    if isinstance(target, int):
        return target if 0 <= target < len(choices) else None
    if isinstance(target, str):
        return choices.index(target) if target in choices else None
    return None


def _records(name: str, task, samples: list[dict], labeller: str, pick_gold: bool = False) -> list[dict]:
    """One label per doc from lm-eval's logged samples of a multiple-choice task (a sample per doc)."""
    import numpy as np

    ref = ref_task_name(name)
    if task.OUTPUT_TYPE != "multiple_choice":
        raise KnnMoeError(f"task {name!r} is {task.OUTPUT_TYPE}; a labelling task must be multiple_choice")
    out = {}
    for s in samples:
        choices = task.doc_to_choice(s["doc"])
        args = [tuple(a) for a in s["arguments"]]
        if len(args) != len(choices) or len({ctx for ctx, _ in args}) != 1:
            raise KnnMoeError(f"{name} doc {s['doc_id']}: expected one request per choice on one context "
                              "(acc_mutual_info and multiple_input tasks cannot be labelled)")
        gold = _gold_index(s["target"], choices)
        if pick_gold:
            if gold is None:
                raise KnnMoeError(f"{name} doc {s['doc_id']}: no gold answer to copy (target {s['target']!r})")
            pred = pred_norm = gold
        else:
            lls = np.array([float(r[0]) for r in s["filtered_resps"]])  # (n_choices,)
            pred = int(np.argmax(lls))  # first maximum, as lm-eval's acc
            pred_norm = int(np.argmax(lls / np.array([float(len(c)) for c in choices])))  # acc_norm's rule
        out[s["doc_id"]] = {
            "task": ref, "doc_id": s["doc_id"], "context": args[pred][0], "continuation": args[pred][1],
            "choice": pred, "gold": gold, "gold_agrees": None if gold is None else pred == gold,
            "choice_norm": pred_norm, "labeller": labeller,
        }
    return [out[d] for d in sorted(out)]


def _summary(records: list[dict], labeller: str) -> dict:
    per_task: dict[str, dict] = {}
    for r in records:
        t = per_task.setdefault(r["task"], {"docs": 0, "with_gold": 0, "gold_agrees": 0, "gold_agrees_norm": 0})
        t["docs"] += 1
        if r["gold"] is not None:
            t["with_gold"] += 1
            t["gold_agrees"] += int(r["gold_agrees"])
            t["gold_agrees_norm"] += int(r["choice_norm"] == r["gold"])
    for t in per_task.values():
        t["agreement"] = t["gold_agrees"] / t["with_gold"] if t["with_gold"] else None
        t["agreement_norm"] = t["gold_agrees_norm"] / t["with_gold"] if t["with_gold"] else None
    return {"labeller": labeller, "tasks": per_task}


def write_labels(path: str | Path, records: list[dict]) -> str:
    """JSON lines under a temporary name, then renamed: a reader never sees half a labels file. Returns sha256."""
    from ..core.files import atomic_path, sha256_file

    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return sha256_file(Path(path))


def summary_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".summary.json")


def _labeller_name(model, model_args) -> str:
    if isinstance(model, str):
        args = model_args if isinstance(model_args, str) or model_args is None else \
            ",".join(f"{k}={v}" for k, v in model_args.items())
        return f"{model} {args}".strip() if args else model
    hf = getattr(model, "model", None)  # HFLM.model: the (accelerate-unwrapped) transformers model
    return f"{type(model).__name__} {getattr(hf, 'name_or_path', '')}".strip()


def make_labels(
    model,
    model_args: str | dict | None = None,
    tasks: str | list[str] = (),
    out: str | Path = "labels.jsonl",
    *,
    include_path: str | None = None,
    metadata: dict | None = None,
    limit: int | float | None = None,
    labeller: str | None = None,
    task_manager=None,
    **evaluate_kwargs,
) -> dict | None:
    """Label the docs of `<ref task>_mc` tasks with `model`'s picks; write `out` and its summary; return the summary.

    model: an lm-eval model name (with `model_args`), an lm-eval `LM` instance (a model already loaded), or
    "gold" (labels copied from the gold answers, no model run: the control that must rebuild the gold memory).
    task_manager: an lm-eval TaskManager to use instead of one made from include_path and metadata (indexing
    lm-eval's own tasks takes seconds; share one across calls). evaluate_kwargs go to `lm_eval.simple_evaluate`
    (batch_size, device, apply_chat_template, ...). Returns None
    on the non-zero ranks of a multi-process run (rank 0 writes).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise KnnMoeError("no tasks to label: pass the multiple-choice views, e.g. tasks=['knnmoe_medmcqa_ref_mc']")
    gold = isinstance(model, str) and model == GOLD
    name = labeller or (GOLD if gold else _labeller_name(model, model_args))
    # as lm-eval's CLI does: model_args join the metadata (the toy tasks find their data through pretrained=)
    merged = (simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args or {}))
    manager = task_manager or TaskManager(include_path=include_path, metadata={**merged, **(metadata or {})})
    loaded = manager.load(tasks)["tasks"]
    for task_name in loaded:
        ref_task_name(task_name)  # refuse a wrongly named task before any model is loaded or run
    if gold:
        samples = _gold_samples(loaded, limit)
    else:
        results = simple_evaluate(model=model, model_args=model_args, tasks=list(loaded.values()),
                                  task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0,
                                  **evaluate_kwargs)
        if results is None:
            return None
        samples = results["samples"]
    records = [r for task_name, task in loaded.items() for r in _records(task_name, task, samples[task_name], name, gold)]
    digest = write_labels(out, records)
    summary = {**_summary(records, name), "labels": str(out), "sha256": digest}
    from ..core.files import write_json_atomic

    write_json_atomic(summary_path(out), summary)
    return summary


def _gold_samples(loaded: dict, limit) -> dict[str, list[dict]]:
    """The fields of lm-eval's logged samples that `_records` reads, from the tasks' own requests (no model)."""
    from lm_eval.evaluator_utils import get_sample_size

    out = {}
    for name, task in loaded.items():
        task.build_all_requests(limit=get_sample_size(task, limit))
        by_doc: dict[int, list] = {}
        for inst in task.instances:
            by_doc.setdefault(inst.doc_id, []).append(inst)
        out[name] = [
            {"doc_id": d, "doc": insts[0].doc, "target": task.doc_to_target(insts[0].doc),
             "arguments": [i.args for i in sorted(insts, key=lambda i: i.idx)]}
            for d, insts in sorted(by_doc.items())
        ]
    return out


def read_labels(path: str | Path) -> dict[tuple[str, int], Label]:
    """(ref task, doc_id) -> Label. Plain JSON lines only; a malformed line or a conflicting duplicate is an error."""
    path = Path(path)
    if not path.is_file():
        raise KnnMoeError(f"labels file {path} not found; write one with python -m knnmoe_eval.harness.labels")
    labels: dict[tuple[str, int], Label] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                key, label = (str(r["task"]), int(r["doc_id"])), Label(str(r["context"]), str(r["continuation"]))
            except (ValueError, KeyError, TypeError) as err:
                raise KnnMoeError(f"{path} line {n}: not a label ({err}); each line needs task, doc_id, context "
                                  "and continuation, as python -m knnmoe_eval.harness.labels writes") from None
            if labels.setdefault(key, label) != label:
                raise KnnMoeError(f"{path} line {n}: a second, different label for {key[0]} doc {key[1]}")
    if not labels:
        raise KnnMoeError(f"labels file {path} is empty")
    return labels


def labelled_continuation(labels: dict[tuple[str, int], Label], task: str, doc_id: int, context: str,
                          source: str = "the labels file") -> str:
    """The label's continuation for one build request, refusing a missing label or one for another context."""
    label = labels.get((task, doc_id))
    if label is None:
        raise KnnMoeError(
            f"{source} has no label for {task} doc {doc_id}; label every document the build reads: run "
            f"python -m knnmoe_eval.harness.labels over {task}{MC_SUFFIX} with the same --limit and --metadata as the build"
        )
    if label.context != context:
        at = next((i for i, (a, b) in enumerate(zip(label.context, context)) if a != b), min(len(label.context), len(context)))
        raise KnnMoeError(
            f"{source}: the label of {task} doc {doc_id} was made on another context (first difference at "
            f"character {at}: {label.context[at:at + 40]!r} vs the build's {context[at:at + 40]!r}); relabel with "
            "the build's prompt settings (same --metadata, chat template, few-shot and system instruction)"
        )
    return label.continuation


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"lm-eval model name (hf, hf-knnmoe, ...), or {GOLD!r} to copy gold")
    p.add_argument("--model_args", default="", help="lm-eval model_args of the labeller")
    p.add_argument("--tasks", required=True, help="comma-separated <build task>_mc tasks (or a tag of them)")
    p.add_argument("--out", required=True, help="labels file to write (JSON lines); its summary goes next to it")
    p.add_argument("--include_path", default=None, help="where our task YAMLs are (e.g. tasks)")
    p.add_argument("--metadata", default=None, help="JSON passed to the tasks, as lm_eval --metadata")
    p.add_argument("--limit", type=float, default=None, help="label only the first N docs (as lm_eval --limit)")
    p.add_argument("--batch_size", default=1)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    kwargs = {} if a.model == GOLD else {"batch_size": a.batch_size, "device": a.device}
    limit = None if a.limit is None else int(a.limit) if a.limit >= 1 else a.limit
    summary = make_labels(a.model, a.model_args, a.tasks.split(","), a.out, include_path=a.include_path,
                          metadata=json.loads(a.metadata) if a.metadata else None, limit=limit, **kwargs)
    if summary is not None:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
