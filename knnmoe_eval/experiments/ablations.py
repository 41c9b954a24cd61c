"""The paper's ablations (§6 and appendix), each one `Runner` call writing ablations/<name>.{md,json,png}.

n: reference-set size N (N = 0 is zero-shot) · k: neighbours, with the top-1 neighbour's share of the similarity
mass · steps: gradient steps T · similarity: rbf, rbf on L2-normed vectors, cosine · ppl: gain per zero-shot
perplexity bucket, and Selective · cost: build time of kNN-MoE against LoRA and router-only SFT, and evaluation
time · latency: evaluation time and peak memory against N for the exact and IVFPQ indexes · unlabelled: memories
built from self- or judge-labelled references against gold labels (beyond the paper) · load_balance: the family's
load-balancing loss on the test prompts per method (Table 11) · seeds: mean and std of the SFT baselines over
training seeds (Appendix D) · plus: `preset=plus` with one ingredient at a time put back to the paper's setting
(beyond the paper, docs/plus.md).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from ..core.files import write_json_atomic
from ..core.options import default
from ..errors import KnnMoeError
from .runner import BENCHMARKS, DENSE, PLUS
from .significance import BUCKETS, perplexity_buckets

# preset=plus without one ingredient: (build overrides, evaluation overrides), each the paper's own setting
PLUS_INGREDIENTS = {
    "grad=dense": ({"grad": "paper"}, {}),
    "Adam, T 30, lr 1": ({"optimizer": "sgd", "steps": 1, "eta": default("eta")}, {}),
    "free=kept": ({"free": "all"}, {}),
    "keys=mixed": ({"keys": "stock"}, {}),
    "confidence=radius": ({}, {"confidence": "kernel"}),
}


def ablate(runner, name: str) -> str:
    """Run one ablation, write its files and return its markdown table."""
    if name not in ABLATIONS:
        raise KnnMoeError(f"unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}")
    benches = [BENCHMARKS[b] for b in runner.settings.benchmarks]
    rows, x, y, kind = ABLATIONS[name](runner, benches)
    out = runner.out / "ablations"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", {"ablation": name, "rows": rows})
    markdown = f"### Ablation: {name}\n\n" + markdown_rows(rows) + "\n"
    (out / f"{name}.md").write_text(markdown)
    _plot(rows, x, y, kind, f"{name} ({runner.pretrained.rstrip('/').split('/')[-1]})", out / f"{name}.png")
    return markdown


def _accuracy_row(records: dict) -> dict:
    """Per-benchmark accuracy and Avg. over all test items together."""
    row = {b: float(np.mean(r["scores"])) for b, r in records.items()}
    row["Avg."] = float(np.mean(np.concatenate([r["scores"] for r in records.values()])))
    return row


def _sweep(runner, benches, label: str, values, knn_kwargs) -> list[dict]:
    rows = []
    for v in values:
        records = {b.name: runner.knn(b, f"ablate-{label}/{v}", **knn_kwargs(v)) for b in benches}
        rows.append({label: v, **_accuracy_row(records), **_top1(records)})
    return rows


def _top1(records: dict) -> dict:
    shares = [d["top1_share"] for r in records.values() for d in (r.get("diagnostics") or {}).values()
              if d.get("top1_share") is not None]
    return {"top-1 share": float(np.mean(shares))} if shares else {}


def _n(runner, benches):
    return _sweep(runner, benches, "N", runner.settings.n_values, lambda n: {"n": n}), "N", "Avg.", "line"


def _k(runner, benches):
    return _sweep(runner, benches, "k", runner.settings.k_values, lambda k: {"k": k}), "k", "Avg.", "line"


def _steps(runner, benches):
    return _sweep(runner, benches, "T", runner.settings.step_values, lambda t: {"build": {"steps": t}}), "T", "Avg.", "line"


def _similarity(runner, benches):
    return _sweep(runner, benches, "similarity", runner.settings.similarities, lambda s: {"similarity": s}), "similarity", "Avg.", "bar"


def _ppl(runner, benches):
    """Accuracy gain of kNN-MoE over zero-shot inside each third of the test items by zero-shot perplexity."""
    columns = {"Zero-shot": [], "kNN-MoE": [], "kNN-MoE (Selective)": [], "kNN-MoE (grad=dense)": [], "bucket": []}
    for b in benches:
        columns["Zero-shot"].append(runner.zero_shot(b)["scores"])
        columns["kNN-MoE"].append(runner.knn(b)["scores"])
        columns["kNN-MoE (Selective)"].append(runner.selective(b)["scores"])
        columns["kNN-MoE (grad=dense)"].append(runner.knn_dense(b)["scores"])
        columns["bucket"].append(perplexity_buckets(runner.perplexity(b)))  # bucketed within each benchmark
    cat = {k: np.concatenate(v) for k, v in columns.items()}
    rows = []
    for bucket in BUCKETS:
        m = cat["bucket"] == bucket
        zero = cat["Zero-shot"][m].mean()
        rows.append({"PPL bucket": bucket, "items": int(m.sum()), "Zero-shot": float(zero),
                     **{f"Δ {k}": float(cat[k][m].mean() - zero) for k in columns if k not in ("Zero-shot", "bucket")}})
    return rows, "PPL bucket", "Δ kNN-MoE", "bar"


def _cost(runner, benches):
    """Build (or training) wall time and test-set evaluation wall time per method, summed over benchmarks. The
    IVFPQ row's build adds its index training (the paper's Table 7 counts it apart: "index s")."""
    rows = []
    index_s = [_index_train_s(runner.memory(b)) for b in benches]
    index_s = None if None in index_s else float(sum(index_s))
    for label, build, evaluate in (
        ("kNN-MoE", lambda b: _build_s(runner.memory(b)), lambda b: runner.knn(b)),
        ("kNN-MoE (IVFPQ)", lambda b: _build_s(runner.memory(b)), runner.knn_ivfpq),
        ("kNN-MoE (grad=dense)", lambda b: _build_s(runner.memory(b, **DENSE)), runner.knn_dense),
        ("kNN-MoE (plus)", lambda b: _build_s(runner.memory(b, **PLUS)), runner.knn_plus),
        ("LoRA SFT", lambda b: _train_s(runner.adapter(b, "lora")), None),
        ("Router-only SFT", lambda b: _train_s(runner.adapter(b, "router")), None),
        ("Zero-shot", lambda b: 0.0, lambda b: runner.zero_shot(b)),
        ("C3PO", lambda b: _build_s(runner.c3po_references(b).with_suffix("")), runner.c3po),  # its stock pass
    ):
        builds = [build(b) for b in benches]
        try:
            evals = [evaluate(b)["wall_s"] for b in benches] if evaluate else []
        except KnnMoeError:  # IVFPQ on a memory too small to train: the table run says why
            evals = []
        row = {"method": label, "build s": None if None in builds else float(sum(builds)),
               "eval s": float(sum(evals)) if evals else None, "index s": None}
        if label == "kNN-MoE (IVFPQ)":
            row["index s"] = index_s
            row["build s"] = None if None in (row["build s"], index_s) else row["build s"] + index_s
        rows.append(row)
    return rows, "method", "build s", "bar"


def _index_train_s(memory: Path) -> float | None:
    """Seconds to train and fill the `ivfpq` index of every layer of `memory` (none saved is read), cached beside
    the memory's build timing; None where the memory is too small to train one."""
    from ..core import index as knn_index
    from ..core.memory import load_memory

    path = memory.parent / f"{memory.name}.ivfpq.json"
    if path.exists():
        return json.loads(path.read_text())["wall_s"]
    layers = load_memory(memory).layers.values()
    start = time.perf_counter()
    try:
        for layer in layers:
            plan = knn_index.plan("ivfpq", layer.keys.shape[1], layer.keys.shape[0])
            knn_index.build_index(layer.keys, plan.factory, plan.nprobe)
    except KnnMoeError:
        return None
    wall = time.perf_counter() - start
    write_json_atomic(path, {"wall_s": wall, "layers": len(layers)})
    return wall


def _build_s(memory: Path) -> float | None:
    timing = memory.parent / f"{memory.name}.build.json"
    return json.loads(timing.read_text())["wall_s"] if timing.exists() else None


def _train_s(adapter: Path) -> float:
    return float(json.loads((adapter / "train.json").read_text())["wall_time_s"])


def _latency(runner, benches):
    """Evaluation time and peak memory against N, exact and IVFPQ, timed afresh in this run (never cached)."""
    rows = []
    zero_s, zero_mem, items = _timed(runner, benches, lambda b: runner.base)
    per_example = lambda s: 1000 * s / items  # noqa: E731 (the paper's Table 8 unit)
    rows.append({"N": 0, "index": "none (zero-shot)", "eval s": zero_s, "ms per example": per_example(zero_s),
                 "× zero-shot": 1.0, "peak MiB": zero_mem})
    for n in [v for v in runner.settings.n_values if v != 0]:  # None: the whole reference set
        for index in ("exact", "ivfpq"):
            memories = {b.name: runner.memory(b, n=n) for b in benches}
            row = {"N": n, "index": index, "keys per layer (all benchmarks)": _keys(memories)}
            try:
                s, mem, _ = _timed(runner, benches, lambda b: runner.knn_lm(memories[b.name], k=runner.k(), index=index))
                rows.append({**row, "eval s": s, "ms per example": per_example(s), "× zero-shot": s / zero_s,
                             "peak MiB": mem})
            except KnnMoeError as e:  # e.g. IVFPQ on a memory too small to train
                rows.append({**row, "eval s": None, "ms per example": None, "× zero-shot": None, "peak MiB": None,
                             "note": str(e)})
    # C3PO (Table 10) on the same footing: its per-input NGD is the price it pays at test time
    s, mem, _ = _timed(runner, benches, lambda b: runner.c3po_lm(runner.c3po_references(b)))
    rows.append({"N": runner.settings.ref_limit, "index": "none (C3PO)", "eval s": s, "ms per example": per_example(s),
                 "× zero-shot": s / zero_s, "peak MiB": mem})
    return rows, "N", "× zero-shot", "latency"


def _keys(memories: dict) -> int:
    return sum(next(iter(json.loads((m / "manifest.json").read_text())["layers"].values()))["num_keys"]
               for m in memories.values())


def _timed(runner, benches, make_lm) -> tuple[float, float | None, int]:
    """Wall seconds of evaluating every benchmark's test task, the peak memory meanwhile in MiB (`PeakMemory`: on
    CUDA torch's peak allocation plus the device memory outside torch, faiss-gpu's included; on the CPU the peak
    anonymous resident memory), and the test items evaluated. Models, memories and tasks are loaded before the
    clock starts, so the time is the evaluation's alone; what they hold is inside the peak, their loading's
    transient buffers are not."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import get_task_dict

    from .peak_memory import PeakMemory

    runs = [(make_lm(b), get_task_dict([b.test_task(runner.settings.scoring)], runner.task_manager)) for b in benches]
    with PeakMemory(runner.base.device) as peak:
        start, items = time.perf_counter(), 0
        for lm, tasks in runs:
            result = evaluate(lm, tasks, limit=runner.settings.limit, bootstrap_iters=0, verbosity="ERROR")
            items += sum(count["effective"] for count in result["n-samples"].values())
        wall = time.perf_counter() - start
        peak_bytes = peak.measure()["peak_bytes"]
    return wall, None if peak_bytes is None else peak_bytes / 2**20, items


def _unlabelled(runner, benches):
    """Memories from references labelled by the model itself (and by a judge) instead of gold answers."""
    from ..harness.labels import make_labels, summary_path

    rows = []
    labellers = {"gold": None, "self": lambda b: runner.base}
    if runner.settings.judge:
        labellers["judge"] = runner.judge_lm
    for name, labeller in labellers.items():
        records, agreement = {}, []
        for b in benches:
            if b.ref_mc is None:
                raise KnnMoeError(f"benchmark {b.name} has no multiple-choice reference task to label")
            build = {}
            if labeller is not None:
                path = runner.out / "labels" / f"{b.name}-{name}-n{runner.settings.ref_limit or 'all'}.jsonl"
                if not summary_path(path).exists():  # written after the labels: a finished labelling
                    make_labels(labeller(b), None, [b.ref_mc], path, limit=runner.settings.ref_limit,
                                labeller=runner.settings.judge if name == "judge" else "self",
                                task_manager=runner.task_manager)
                agreement.append(json.loads(summary_path(path).read_text())["tasks"][b.ref]["agreement"])
                build = {"labels": str(path)}
            records[b.name] = runner.knn(b, f"ablate-labels/{name}", build=build)
        rows.append({"labels": name, "agree with gold": float(np.mean(agreement)) if agreement else 1.0,
                     **_accuracy_row(records)})
    zero = _accuracy_row({b.name: runner.zero_shot(b) for b in benches})
    rows.insert(0, {"labels": "none (zero-shot)", "agree with gold": None, **zero})
    return rows, "labels", "Avg.", "bar"


def _load_balance(runner, benches):
    """Mean load-balancing loss over the test prompts per method (Table 11), per benchmark and over all items."""
    methods = {
        "Zero-shot": lambda b: runner.load_balance("zero-shot", b, lambda: runner.base),
        "LoRA SFT": lambda b: _sft_balance(runner, b, "lora"),
        "Router-only SFT": lambda b: _sft_balance(runner, b, "router"),
        "kNN-MoE": lambda b: runner.load_balance("knn", b, lambda: runner.knn_lm(runner.memory(b), k=runner.k()),
                                                 config={"memory": runner.memory(b).name, "k": runner.k()}),
    }
    rows = []
    for method, measure in methods.items():
        losses = {b.name: measure(b) for b in benches}
        rows.append({"method": method, **{b: float(v.mean()) for b, v in losses.items()},
                     "Avg.": float(np.concatenate(list(losses.values())).mean())})
    return rows, "method", "Avg.", "bar"


def _sft_balance(runner, bench, method: str) -> np.ndarray:
    adapter = runner.adapter(bench, method)
    return runner.load_balance(f"sft-{method}", bench, lambda: runner.peft_lm(adapter), config={"adapter": adapter.name})


def _seeds(runner, benches):
    """Accuracy of LoRA and router-only SFT over training seeds (Appendix D): mean and sample std per benchmark.
    The run with --seed is Table 1's; every finished run is reused."""
    rows = []
    for b in benches:
        row = {"benchmark": b.name, "seeds": len(runner.settings.seeds)}
        for label, method in (("LoRA SFT", "lora"), ("Router-only SFT", "router")):
            acc = np.array([np.mean(runner.sft(b, method, seed)["scores"]) for seed in runner.settings.seeds])
            row[f"{label} mean"] = float(acc.mean())
            row[f"{label} std"] = float(acc.std(ddof=1)) if acc.size > 1 else None
        rows.append(row)
    return rows, "benchmark", "LoRA SFT mean", "bar"


def _plus(runner, benches):
    """preset=plus, then the same with one ingredient at a time back at the paper's setting, and the paper."""
    rows = [{"kNN-MoE": "paper", **_accuracy_row({b.name: runner.knn(b) for b in benches})},
            {"kNN-MoE": "plus", **_accuracy_row({b.name: runner.knn_plus(b) for b in benches})}]
    ingredients = dict(PLUS_INGREDIENTS)
    if runner.settings.calibration:  # the uncapped radius itself: the probe, which may refuse it, is not the row's
        ingredients["calibration"] = ({"calibration": None, "probe_tokens": 0}, {})
    for name, (build, options) in ingredients.items():
        records = {b.name: runner.knn(b, f"ablate-plus/without-{re.sub(r'[^a-z0-9]+', '-', name.lower())}",
                                      build={**PLUS, **build}, **PLUS, **options) for b in benches}
        rows.append({"kNN-MoE": f"plus − {name}", **_accuracy_row(records)})
    return rows, "kNN-MoE", "Avg.", "bar"


# name -> (runner, benchmarks) -> (rows, x column, y column, plot kind), in the order `ablate` runs them
ABLATIONS = {"n": _n, "k": _k, "steps": _steps, "similarity": _similarity, "ppl": _ppl, "cost": _cost,
             "latency": _latency, "unlabelled": _unlabelled, "load_balance": _load_balance, "seeds": _seeds,
             "plus": _plus}


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_rows(rows: list[dict], fmt=_cell) -> str:
    """A markdown table of `rows`, one column per key in first-seen order, each cell `fmt(value)`."""
    columns = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _plot(rows: list[dict], x: str, y: str, kind: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if kind == "line":
        ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o")
        ax.set_xscale("symlog" if x == "N" else "linear")
        ax.set_xticks([r[x] for r in rows], [str(r[x]) for r in rows])
    elif kind == "latency":
        for index in ("exact", "ivfpq"):
            pts = [r for r in rows if r["index"] == index and r[y] is not None]
            ax.plot([r["N"] for r in pts], [r[y] for r in pts], marker="o", label=index)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend()
    else:
        labels = [str(r[x]) for r in rows]
        ax.bar(labels, [r[y] or 0.0 for r in rows])
        ax.tick_params(axis="x", labelrotation=20)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
