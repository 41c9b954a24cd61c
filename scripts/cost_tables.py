"""The paper's cost tables (Tables 7, 8 and 9) measured at OLMoE-1B-7B's real dimensions, beside the paper's figures.

The model is OLMoE-1B-7B-0125-Instruct from its vendored published config (`knnmoe_eval.testing_real`: hidden
2048, 16 heads, 64 experts of width 1024, top-8, vocabulary 50304, its real tokenizer), random weights, with
`num_hidden_layers` cut to --layers (1 by default: what 2 CPU cores and a few minutes allow). Every figure is
measured at --layers layers and, marked "extrapolated", scaled to OLMoE's 16 layers:
- inference time: the stock time splits into the decoder layers' share (forward hooks, in a run of its own) and
  the rest (embedding, LM head, decoding loop); the layers' part is multiplied by 16 / --layers, and so is
  kNN-MoE's extra time (search and mixing happen once per MoE layer);
- build time: a line a + b·layers through builds at --layers and --layers + 1 (the backward crosses every layer
  above the lowest router, so a forward share would not do);
- memory: stock weights of the missing layers are added from the parameter count, kNN-MoE's extra memory (index,
  values) is multiplied by 16 / --layers.

Table 7 (preparation time): the memory build through `hf-knnmoe` mode=build per reference item (prompt plus gold
letter, teacher-forced), and the build of the whole reference set at the paper's N; the `ivfpq` index's training
and filling per layer at the paper's largest N. Table 8 (latency per example): `hf` and `hf-knnmoe` (exact and
ivfpq) on the same prompts, greedy generation of --gen-tokens tokens after a --prompt-tokens prompt, one example at
a time; `hf` is timed right before and right after each N and the ratio is against the mean of the two. Table 9
(memory during inference: the peak over the warm-up and timed runs, with the model, index and values loaded): on
CUDA `torch.cuda.max_memory_allocated` plus the device memory in use outside torch (faiss-gpu's indexes and its
StandardGpuResources scratch, the CUDA context); on the CPU the peak anonymous resident memory (RssAnon, sampled
every 20 ms); `knnmoe_eval.experiments.peak_memory` says why.

The paper's N values are lost from its text export. Our reading: Table 9's exact column grows by 3.29, 6.45 and
12.79 GB over zero-shot; at 2,048·2 + 64·4 = 4,352 bytes per key (fp16 key, fp32 values) over 16 layers that is
47k, 93k and 184k keys per layer, the last being the whole MedMCQA train split at one answer token per reference
(182,822, docs/tasks.md). Those are the default --keys. Memories hold synthetic clustered keys
(perf_overhead.synthetic_keys): timing and memory do not depend on what the keys are.

    OMP_NUM_THREADS=2 python scripts/cost_tables.py   # CPU defaults: 11 min on 2 loaded cores, 5.4 GiB
    python scripts/cost_tables.py --layers 16 --gen-tokens 256 --examples 32   # a GPU: all 16 layers, nothing extrapolated

Writes --json (results/cost_tables.json), a plot of Tables 8 and 9 beside it (.png), and prints the three tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_load import Load, require_quiet  # noqa: E402
from perf_overhead import random_memory  # noqa: E402

from knnmoe_eval.experiments.ablations import markdown_rows  # noqa: E402
from knnmoe_eval.experiments.peak_memory import PeakMemory, trim  # noqa: E402

MODEL = "olmoe-1b-7b-0125-instruct"
REAL_LAYERS = 16
REFERENCES = 182_822  # MedMCQA train: the paper's Table 7 memory (our reading, docs/tasks.md)
GB = 1e9

# The paper's figures (OLMoE-1B-7B-0125-Instruct, one A100 80GB). Table 7 in hours; the IVFPQ variant's extra
# index time is given in its text ("an extra ... h"), whose number is lost from the export. Table 8 in seconds
# per example, Table 9 in GB, rows N = 0 (zero-shot) and three memory sizes.
PAPER = {
    "table7_h": {"SFT (LoRA)": 1.34, "SFT (router only)": 1.33, "kNN-MoE memory": 0.46, "IVFPQ extra": None},
    "table8_s": {"zero-shot": 5.99, "exact": [6.19, 6.41, 6.83], "ivfpq": [6.14, 6.16, 6.21]},
    "table9_gb": {"zero-shot": 16.02, "exact": [19.31, 22.47, 28.81], "ivfpq": [16.21, 16.94, 17.53]},
}
BYTES_PER_KEY = 2048 * 2 + 64 * 4  # exact memory: fp16 key and fp32 values per key and layer


def paper_keys() -> list[int]:
    """Keys per layer of Tables 8-9's three memories, read from Table 9's exact column (see the docstring)."""
    base = PAPER["table9_gb"]["zero-shot"]
    return [round((gb - base) * GB / (BYTES_PER_KEY * REAL_LAYERS)) for gb in PAPER["table9_gb"]["exact"]]


def extrapolate(at: dict[int, float], layers: int = REAL_LAYERS) -> float:
    """a + b·layers through the two measured layer counts (at = {layers: value})."""
    (l0, v0), (l1, v1) = sorted(at.items())
    b = (v1 - v0) / (l1 - l0)
    return v0 + b * (layers - l0)


# -- inputs ------------------------------------------------------------------------------------------------

_SENTENCES = [
    "A {age}-year-old presents with three weeks of progressive fatigue, exertional dyspnoea and a dry cough.",
    "Her past history includes type 2 diabetes treated with metformin, hypertension and a cholecystectomy.",
    "On examination the temperature is 38.2 C, pulse 112/min and blood pressure 96/60 mm Hg.",
    "Laboratory studies show haemoglobin 10.1 g/dL, leukocytes 16,400/mm3 with 85% neutrophils.",
    "Serum sodium is 129 mmol/L, potassium 3.4 mmol/L and creatinine 140 umol/L.",
    "A chest radiograph shows a right lower lobe opacity with blunting of the costophrenic angle.",
    "The patient smokes 20 cigarettes a day and has worked in a shipyard since the age of 19.",
    "Which of the following is the most appropriate next step in management?",
]
_OPTIONS = ["Intercostal chest drain", "Repeat chest radiograph in six weeks", "Bronchoscopy", "Oral prednisolone"]


def prompts(tok, n: int, tokens: int, seed: int) -> list[str]:
    """n MedMCQA-style prompts (question, four options, "Answer:") of `tokens` tokens each under `tok`."""
    rng = random.Random(seed)
    tail = "\n" + "\n".join(f"{l}. {o}" for l, o in zip("ABCD", _OPTIONS)) + "\nAnswer:"
    out = []
    for i in range(n):
        words = []
        while len(tok(" ".join(words) + tail, add_special_tokens=False)["input_ids"]) < tokens:
            words += rng.choice(_SENTENCES).format(age=20 + i).split()
        ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
        keep = tokens - len(tok(tail, add_special_tokens=False)["input_ids"])
        out.append("Question: " + tok.decode(ids[: max(keep - 2, 1)]) + tail)
    return out


def loglikelihood_requests(texts: list[str]):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, (t, " " + "ABCD"[i % 4]), 0, ("cost_ref", i, 1)) for i, t in enumerate(texts)]


def generation_requests(texts: list[str], gen_tokens: int):
    from lm_eval.api.instance import Instance

    kwargs = {"until": ["\n\n\n\n\n\n"], "max_gen_toks": gen_tokens, "do_sample": False}
    return [Instance("generate_until", {}, (t, dict(kwargs)), 0, ("cost_test", i, 1)) for i, t in enumerate(texts)]


# -- runs -------------------------------------------------------------------------------------------------


def make_lm(model, tok, device: torch.device, **knn):
    import lm_eval.models  # noqa: F401  (registers `hf` before ours)
    from lm_eval.models.huggingface import HFLM

    from knnmoe_eval.harness.lm import KnnMoeLM

    cls = KnnMoeLM if knn else HFLM
    return cls(pretrained=model, tokenizer=tok, batch_size=1, max_length=2048, device=str(device), **knn)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(lm, reqs, device) -> tuple[float, list[str]]:
    _sync(device)
    start = time.perf_counter()
    out = lm.generate_until(reqs, disable_tqdm=True)
    _sync(device)
    return time.perf_counter() - start, out


def layer_share(model, lm, reqs, device) -> float:
    """The share of a stock generation's time spent inside the decoder layers (forward hooks on each, CUDA
    synchronised there): the rest is the embedding, the LM head and the decoding loop. A ratio from one run, so
    that load drifting between runs does not enter the 16-layer extrapolation; timed in a run of its own, as the
    hooks' synchronisation would slow a timed one."""
    inside, started = [0.0], []

    def pre(module, args):
        _sync(device)
        started.append(time.perf_counter())

    def post(module, args, output):
        _sync(device)
        inside[0] += time.perf_counter() - started.pop()

    handles = [h for layer in model.model.layers for h in (layer.register_forward_pre_hook(pre),
                                                           layer.register_forward_hook(post))]
    try:
        total, _ = timed_generation(lm, reqs, device)
    finally:
        for h in handles:
            h.remove()
    return inside[0] / total


def build_seconds(model, tok, device, reqs, workdir: Path) -> float:
    """Wall seconds of `hf-knnmoe` mode=build over `reqs`, memory written included."""
    out = Path(tempfile.mkdtemp(dir=workdir)) / "built"
    lm = make_lm(model, tok, device, memory=str(out), mode="build")
    _sync(device)
    start = time.perf_counter()
    lm.loglikelihood(reqs, disable_tqdm=True)
    _sync(device)
    seconds = time.perf_counter() - start
    del lm
    return seconds


def timed_build(model, tok, device, texts_ref: list[str], workdir: Path) -> tuple[float, dict]:
    """The build over `texts_ref` after a one-reference warm-up: its seconds and the machine's load meanwhile."""
    reqs = loglikelihood_requests(texts_ref)
    build_seconds(model, tok, device, reqs[:1], workdir)
    with Load() as load:
        seconds = build_seconds(model, tok, device, reqs, workdir)
    return seconds, load.record


def train_ivfpq(memory: Path) -> float:
    """Seconds to train and fill the `ivfpq` index of every layer of `memory`; saved there, so the LM loads it."""
    from knnmoe_eval.core import index as knn_index
    from knnmoe_eval.core.memory import load_memory

    mem = load_memory(memory, verify=False)
    seconds = 0.0
    for layer, lm_layer in mem.layers.items():
        plan = knn_index.plan("ivfpq", lm_layer.keys.shape[1], lm_layer.keys.shape[0])
        start = time.perf_counter()
        idx = knn_index.build_index(lm_layer.keys, plan.factory, plan.nprobe)
        seconds += time.perf_counter() - start
        spec = knn_index.index_spec(plan.factory, False, mem.manifest["layers"][str(layer)]["sha256"])
        knn_index.save_index(idx, knn_index.index_path(memory, layer, spec), spec)
    return seconds


def layer_weight_bytes(model) -> int:
    layer = model.model.layers[0]
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def build_fit_phase(layers: int, args, device, dtype, texts_ref, workdir) -> dict:
    """The build at `layers` layers (--layers + 1), for the line through two layer counts: a build's backward
    crosses every layer above the lowest router, so its per-layer cost is not a forward share."""
    from knnmoe_eval.testing_real import make_real_model, real_tokenizer

    tok = real_tokenizer(MODEL)
    model = make_real_model(MODEL, num_hidden_layers=layers, dtype=dtype).to(device)
    build_s, load = timed_build(model, tok, device, texts_ref, workdir)  # warmed up, as at --layers
    del model
    trim()
    return {"layers": layers, "build_s_per_reference": build_s / args.references, **load}


def knn_phase(args, device, dtype, texts_test, texts_ref, workdir, progress) -> tuple[list[dict], dict]:
    """At --layers layers: stock and kNN-MoE generation per N and index, index training, the build."""
    from knnmoe_eval.testing_real import make_real_model, real_tokenizer

    tok = real_tokenizer(MODEL)
    model = make_real_model(MODEL, num_hidden_layers=args.layers, dtype=dtype).to(device)
    reqs = generation_requests(texts_test, args.gen_tokens)
    rows, index_train = [], {}
    hf = make_lm(model, tok, device)
    with PeakMemory(device) as mem:
        timed_generation(hf, reqs, device)
        stock_peak = mem.measure()
    share = layer_share(model, hf, reqs, device)
    progress.update()
    for n in args.keys:
        path = random_memory(workdir / f"mem{n}", model, n)
        if "ivfpq" in args.indexes:
            index_train[n] = train_ivfpq(path)
        progress.update()
        hf_s = []
        with Load() as load:
            hf_s.append(timed_generation(hf, reqs, device)[0])
            for index in args.indexes:
                start = time.perf_counter()
                lm = make_lm(model, tok, device, memory=str(path), index=index, verify=False)
                setup = time.perf_counter() - start
                with PeakMemory(device) as mem:
                    timed_generation(lm, reqs[:1], device)
                    seconds, texts = timed_generation(lm, reqs, device)
                    peak = mem.measure()
                lam = [d["mean_lambda"] for d in lm.retriever.diagnostics().values()]
                generated = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
                rows.append({"keys": n, "index": index, "setup_s": setup, "s_per_example": seconds / len(reqs),
                             "peak_bytes": peak, "mean_lambda": sum(lam) / len(lam), "generated_tokens": generated})
                del lm
                trim()
                progress.update()
            hf_s.append(timed_generation(hf, reqs, device)[0])
        for r in rows:
            if r["keys"] == n:
                r.update(stock_s_per_example=sum(hf_s) / 2 / len(reqs), stock_s=[round(t, 3) for t in hf_s],
                         **load.record)
        shutil.rmtree(workdir / f"mem{n}", ignore_errors=True)
    build_s, build_load = timed_build(model, tok, device, texts_ref, workdir) if args.references else (None, None)
    progress.update()
    base = {"layers": args.layers, "stock_peak": stock_peak, "index_train_s": index_train, "layer_share": share,
            "build_s_per_reference": None if build_s is None else build_s / args.references,
            "build_load": build_load,
            "layer_weight_bytes": layer_weight_bytes(model)}
    del hf, model
    trim()
    return rows, base


# -- tables -----------------------------------------------------------------------------------------------


def tables(rows: list[dict], base: dict, fit: dict | None, args) -> dict:
    """The three tables: measured at --layers, extrapolated to 16 layers, the paper's figures beside."""
    L, scale = args.layers, REAL_LAYERS / args.layers
    paper_n = paper_keys()
    stock_l = sum(r["stock_s_per_example"] for r in rows) / len(rows) if rows else None
    # fixed part (1 - share) and one layer (share / L) of the stock time, the layer repeated 16 times
    share = base["layer_share"]
    stock16 = None if stock_l is None else stock_l * ((1 - share) + share * REAL_LAYERS / L)

    def paper_col(table: str, index: str, n: int):
        return PAPER[table][index][paper_n.index(n)] if n in paper_n else None

    t8, t9 = [], []
    stock_peak = base["stock_peak"]["peak_bytes"]
    weights16 = stock_peak + (REAL_LAYERS - L) * base["layer_weight_bytes"]
    t8.append({"N (keys/layer)": 0, "index": "none (hf)",
               f"ms/example ({L} layer)": None if stock_l is None else 1000 * stock_l, "× hf": 1.0,
               "ms/example (16 layers, extrapolated)": None if stock16 is None else 1000 * stock16,
               "× hf (16, extrapolated)": 1.0, "paper s/example": PAPER["table8_s"]["zero-shot"], "paper ×": 1.0})
    t9.append({"N (keys/layer)": 0, "index": "none (hf)", f"peak GB ({L} layer)": stock_peak / GB,
               "Δ GB": 0.0, "peak GB (16 layers, extrapolated)": weights16 / GB, "Δ GB (16, extrapolated)": 0.0,
               "paper GB": PAPER["table9_gb"]["zero-shot"], "paper Δ GB": 0.0})
    if "outside_torch_bytes" in base["stock_peak"]:  # CUDA: the context, cuBLAS; faiss-gpu in the kNN rows
        t9[-1]["of which outside torch GB"] = base["stock_peak"]["outside_torch_bytes"] / GB
    for r in rows:
        extra = r["s_per_example"] - r["stock_s_per_example"]
        knn16 = None if stock16 is None else stock16 + scale * extra
        p8 = paper_col("table8_s", r["index"], r["keys"])
        t8.append({"N (keys/layer)": r["keys"], "index": r["index"],
                   f"ms/example ({L} layer)": 1000 * r["s_per_example"],
                   "× hf": r["s_per_example"] / r["stock_s_per_example"],
                   "ms/example (16 layers, extrapolated)": None if knn16 is None else 1000 * knn16,
                   "× hf (16, extrapolated)": None if knn16 is None else knn16 / stock16,
                   "paper s/example": p8, "paper ×": None if p8 is None else p8 / PAPER["table8_s"]["zero-shot"]})
        delta = r["peak_bytes"]["peak_bytes"] - stock_peak
        p9 = paper_col("table9_gb", r["index"], r["keys"])
        t9.append({"N (keys/layer)": r["keys"], "index": r["index"], f"peak GB ({L} layer)": r["peak_bytes"]["peak_bytes"] / GB,
                   "Δ GB": delta / GB, "peak GB (16 layers, extrapolated)": (weights16 + scale * delta) / GB,
                   "Δ GB (16, extrapolated)": scale * delta / GB, "paper GB": p9,
                   "paper Δ GB": None if p9 is None else p9 - PAPER["table9_gb"]["zero-shot"]})
        if "outside_torch_bytes" in r["peak_bytes"]:
            t9[-1]["of which outside torch GB"] = r["peak_bytes"]["outside_torch_bytes"] / GB
    t7 = []
    build = {L: base["build_s_per_reference"]}
    if fit and fit.get("build_s_per_reference") is not None:
        build[fit["layers"]] = fit["build_s_per_reference"]
    if base["build_s_per_reference"] is not None:
        per16 = extrapolate(build) if len(build) == 2 else None
        t7.append({"row": "kNN-MoE memory build, per reference", f"measured ({L} layer)": base["build_s_per_reference"],
                   "unit": "s", "16 layers (extrapolated)": per16,
                   "h at the paper's N (16 layers, extrapolated)": None if per16 is None else per16 * REFERENCES / 3600,
                   "paper h": PAPER["table7_h"]["kNN-MoE memory"]})
    for n, s in base["index_train_s"].items():
        t7.append({"row": f"IVFPQ index training and filling, {n} keys/layer", f"measured ({L} layer)": s,
                   "unit": "s", "16 layers (extrapolated)": scale * s,
                   "h at the paper's N (16 layers, extrapolated)": scale * s / 3600 if n == max(paper_n) else None,
                   "paper h": PAPER["table7_h"]["IVFPQ extra"] if n == max(paper_n) else None})
    for name in ("SFT (LoRA)", "SFT (router only)"):
        t7.append({"row": f"{name}: not measured here", "paper h": PAPER["table7_h"][name]})
    return {"table7": t7, "table8": t8, "table9": t9}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def plot(out: dict, path: Path) -> None:
    """Tables 8 and 9 against N, ours (16 layers, extrapolated) solid, the paper's dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (table, col, paper, title) in zip(axes, [
        ("table8", "× hf (16, extrapolated)", "paper ×", "Table 8: latency per example, × stock"),
        ("table9", "Δ GB (16, extrapolated)", "paper Δ GB", "Table 9: memory over stock, GB"),
    ]):
        rows = out["tables"][table]
        for index, color in (("exact", "C0"), ("ivfpq", "C1")):
            pts = [(0, rows[0][col] or 0)] + [(r["N (keys/layer)"], r[col]) for r in rows if r["index"] == index]
            ppts = [(0, rows[0][paper])] + [(r["N (keys/layer)"], r[paper]) for r in rows
                                            if r["index"] == index and r[paper] is not None]
            if all(v is not None for _, v in pts):
                ax.plot(*zip(*pts), "o-", color=color, label=f"ours, {index}")
            if len(ppts) > 1:
                ax.plot(*zip(*ppts), "s--", color=color, alpha=0.6, label=f"paper, {index}")
        ax.set(title=title, xlabel="keys per layer (N)")
        ax.legend()
    m = out["machine"]
    fig.suptitle(f"OLMoE-1B-7B dims, {out['model']['layers']} of 16 layers extrapolated; {m['device']} "
                 f"({m['cpu']}, {m['torch_threads']} threads) vs the paper's A100", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    try:
        import faiss

        out["faiss"] = faiss.__version__
        out["faiss_gpu"] = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except ImportError:
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=1, help="decoder layers kept (OLMoE has 16)")
    p.add_argument("--keys", type=int, nargs="+", default=paper_keys(), help="keys per layer (default: the paper's N)")
    p.add_argument("--indexes", nargs="+", default=["exact", "ivfpq"], choices=["exact", "ivfpq", "ivfpq_rerank", "hnsw"])
    p.add_argument("--examples", type=int, default=4, help="test prompts per timed run")
    p.add_argument("--references", type=int, default=8, help="reference items built per build run (0: no build)")
    p.add_argument("--prompt-tokens", type=int, default=160, help="tokens per prompt (question, options, 'Answer:')")
    p.add_argument("--gen-tokens", type=int, default=16, help="greedy tokens generated per example")
    p.add_argument("--no-fit", action="store_true",
                   help="skip the build at --layers + 1 that separates the build's per-layer time from its fixed part")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA (the paper's), float32 on the CPU")
    p.add_argument("--workdir", type=Path, default=None, help="memories are written here (default: a temporary dir)")
    p.add_argument("--json", type=Path, default=Path("results/cost_tables.json"))
    p.add_argument("--allow-load", action="store_true", help="measure even when other processes are busy")
    args = p.parse_args()
    quiet = require_quiet(args.allow_load)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    fit = args.layers < REAL_LAYERS and not args.no_fit and args.references > 0

    from knnmoe_eval.testing_real import real_tokenizer

    tok = real_tokenizer(MODEL)
    texts_test = prompts(tok, args.examples, args.prompt_tokens, seed=1)
    texts_ref = prompts(tok, args.references, args.prompt_tokens, seed=2)
    steps = 2 + len(args.keys) * (1 + len(args.indexes)) + (1 if fit else 0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, tqdm(total=steps, desc="cost tables") as progress:
        rows, base = knn_phase(args, device, dtype, texts_test, texts_ref, Path(tmp), progress)
        fit_run = None
        if fit:
            fit_run = build_fit_phase(args.layers + 1, args, device, dtype, texts_ref, Path(tmp))
            progress.update()
    out_tables = tables(rows, base, fit_run, args)
    out = {
        "model": {"name": MODEL, "layers": args.layers, "real_layers": REAL_LAYERS, "dtype": str(dtype),
                  "weights": "random (knnmoe_eval.testing_real.make_real_model)", "tokenizer": "real (vendored)"},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "paper": PAPER, "paper_keys_per_layer": paper_keys(), "paper_references": REFERENCES,
        "machine": machine(device), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_at_start": quiet,
        "total_s": time.perf_counter() - t0, "runs": rows, "base": base, "fit": fit_run, "tables": out_tables,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str))
    plot(out, args.json.with_suffix(".png"))
    m = out["machine"]
    print(f"\nOLMoE-1B-7B real dimensions, {args.layers} of 16 layers, {dtype}, {m['device']} ({m['cpu']}, "
          f"{m['torch_threads']} threads); {args.examples} examples of {args.prompt_tokens} prompt + "
          f"{args.gen_tokens} generated tokens; 'extrapolated' columns scale to 16 layers (see --help)")
    for name, title in (("table7", "Table 7: preparation time"), ("table8", "Table 8: latency per example"),
                        ("table9", "Table 9: peak memory during inference")):
        print(f"\n{title}\n{markdown_rows(out_tables[name], _fmt)}")
    print(f"\nThe paper's N (keys per layer, our reading of Table 9): {paper_keys()}; its Table 7 memory: {REFERENCES} "
          "references. Its IVFPQ extra index time is lost from the text export (None).")
    loaded = [r for r in rows if r.get("loaded")]
    if loaded:
        print(f"\nWARNING: {len(loaded)} rows were measured while other processes were busy", file=sys.stderr)
    print(f"\nfigures: {args.json}")


if __name__ == "__main__":
    main()
