"""Index figures, measured in one run: retrieval cost as a fraction of the MoE layer's own compute, where that
cost goes (stage by stage), bytes per stored key, recall@1 and distance ratio against exact search, and toy-demo
accuracy.

Wide part: one decoder layer of OLMoE-1B-7B's shape (hidden 2048, 64 experts of width 1024, top-8, random
weights). Its stock forward on a batch of `--tokens` tokens is "the layer's compute"; retrieval is the real
query path (`_LayerRetrieval.search`: the index search plus, for re-ranked indexes, the true distances of the
candidates) and the whole hook transform (search, similarity, mixing, gating, diagnostics). Keys are synthetic
but structured (`perf_overhead.synthetic_keys`); queries are fresh samples of the keys' distribution, as router
inputs at evaluation are of the memory's (the random model's own router inputs would be out of that
distribution and land in the few largest IVF lists, scanning ~1.7x the keys). Every figure records the machine's
load (`machine_load.py`); the run refuses to start on a busy machine unless --allow-load. Toy part: the toy
demo's memory (built from shift_ref through lm-eval, mode=build) evaluated on knnmoe_toy_shift with each index.

    OMP_NUM_THREADS=2 python scripts/perf_index.py --quick        # ~2 min: 10k keys, toy demo
    OMP_NUM_THREADS=2 python scripts/perf_index.py --keys 100000 --no-toy --workdir W
    # 1M keys: write the memory once (--prepare), then one index per command; trained indexes are kept in W
    OMP_NUM_THREADS=2 python scripts/perf_index.py --keys 1000000 --prepare --workdir W
    OMP_NUM_THREADS=2 python scripts/perf_index.py --keys 1000000 --indexes ivfpq_rerank --no-toy --workdir W
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_overhead import WIDE, random_memory, ratio_table, synthetic_keys, wide_model  # noqa: E402
from machine_load import Load, require_quiet  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def exact_neighbours(keys: torch.Tensor, queries: torch.Tensor, chunk: int = 65_536):
    """Squared distance and id of each query's exact nearest key, by chunked fp32 matmuls over the mapped keys."""
    best_d = torch.full((queries.shape[0],), float("inf"))
    best_i = torch.zeros(queries.shape[0], dtype=torch.long)
    q_sq = (queries * queries).sum(1, keepdim=True)
    for start in range(0, keys.shape[0], chunk):
        k = keys[start : start + chunk].float()
        d2 = q_sq - 2 * queries @ k.T + (k * k).sum(1)  # (queries, chunk)
        d, i = d2.min(1)
        better = d < best_d
        best_d[better], best_i[better] = d[better], i[better] + start
    return best_d, best_i


def stage_ms(lr, q: torch.Tensor, reps: int) -> dict:
    """Where one search's time goes, each stage timed alone on the same queries (CPU faiss indexes): the PCA
    projection, the coarse quantizer, the list scan (or graph walk), and the re-rank of the candidates."""
    import faiss

    from knnmoe_eval.core import index as knn_index

    ms = lambda fn: round(1000 * median_seconds(fn, reps), 2)  # noqa: E731
    if lr.on_device:
        return {}
    wanted = min(knn_index.RERANK, lr.keys.shape[0]) if lr.plan.rerank else 1
    x, inner, stages = q.numpy(), lr.index, {}
    if isinstance(inner, faiss.IndexPreTransform):
        pca = inner.chain.at(0)
        stages["pca_ms"] = ms(lambda: pca.apply(x))
        x, inner = pca.apply(x), faiss.downcast_index(inner.index)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        stages["coarse_ms"] = ms(lambda: ivf.quantizer.search(x, ivf.nprobe))
        coarse_d, coarse_i = ivf.quantizer.search(x, ivf.nprobe)
        stages["scan_ms"] = ms(lambda: ivf.search_preassigned(x, wanted, coarse_i, coarse_d))
    else:
        stages["scan_ms"] = ms(lambda: inner.search(x, wanted))
    if lr.plan.rerank:
        ids = torch.from_numpy(knn_index.search(lr.index, q.numpy(), wanted)[1])
        stages["rerank_ms"] = ms(lambda: knn_index.rerank(q, ids, lr.keys, lr.key_norm, 1, lr.normalize,
                                                         lr.score_dtype))
    return stages


def perf_memory(workdir: Path, model, n: int) -> Path:
    """The synthetic memory of n keys per layer, written once per workdir and reused (with its trained indexes).

    Its sigma statistics use 256 sampled keys instead of 2048: they set lambda only, which no figure here
    depends on, and at 1M keys the full sample alone would take minutes.
    """
    from knnmoe_eval.core import sigma as memory  # where the sigma sample size lives

    path = workdir / f"mem{n}"
    if not (path / "manifest.json").exists():
        sample, memory._SIGMA_SAMPLE = memory._SIGMA_SAMPLE, 256
        try:
            random_memory(path, model, n)
        finally:
            memory._SIGMA_SAMPLE = sample
    return path


def score_dtype_figures(lr, q, exact_d, exact_ids, n: int, name: str, reps: int) -> list[dict]:
    """The re-rank with its ranking products in fp32, fp16 (the default) and bf16: time and what each does to
    recall and to the returned neighbour's distance (the kept neighbours' distances are exact in every case)."""
    from knnmoe_eval.core import index as knn_index

    wanted = min(knn_index.RERANK, lr.keys.shape[0])
    ids = torch.from_numpy(knn_index.search(lr.index, q.numpy(), wanted)[1])
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        run = lambda: knn_index.rerank(q, ids, lr.keys, lr.key_norm, 1, lr.normalize, dtype)  # noqa: E731
        with Load() as load:
            seconds = median_seconds(run, reps)
        dist2, found = run()
        ratio = (dist2[:, 0] / exact_d.clamp_min(1e-12)).sqrt()
        rows.append({"keys": n, "index": name, "score_dtype": str(dtype).rpartition(".")[2],
                     "rerank_ms": round(1000 * seconds, 2),
                     "recall_at_1": round((found[:, 0] == exact_ids).float().mean().item(), 3),
                     "dist_ratio_mean": round(ratio.mean().item(), 5),
                     "dist_ratio_p95": round(ratio.quantile(0.95).item(), 4), **load.record})
    return rows


def wide_figures(args, workdir: Path) -> tuple[list[dict], list[dict]]:
    import torch.nn.functional as F

    from knnmoe_eval.core import index as knn_index
    from knnmoe_eval.core.routers import find_routers
    from knnmoe_eval.core.memory import load_memory
    from knnmoe_eval.core.options import KnnMoeOptions
    from knnmoe_eval.core.retrieval import Retriever

    model = wide_model(layers=1)
    site = find_routers(model)[0]
    shape = (args.tokens // 128 or 1, min(128, args.tokens))
    ids = torch.randint(4, 250, shape, generator=torch.Generator().manual_seed(0))
    rows, score_rows = [], []
    for n in args.keys:
        mem = load_memory(perf_memory(workdir, model, n), verify=False)
        if args.prepare:
            continue
        layer = mem.signature["moe_layers"][0]
        keys = mem.layers[layer].keys
        # random_memory draws layer l's keys with seed l: queries are fresh draws of that distribution
        q = synthetic_keys(args.tokens, WIDE["hidden_size"], seed=layer, draw=10_000 + n).float()
        with torch.no_grad():
            z = F.linear(q, site.module.weight)  # (tokens, E) the router logits of these queries
        exact_d, exact_ids = exact_neighbours(keys, q)
        for name in args.indexes:
            with Load() as load:
                start = time.perf_counter()
                retriever = Retriever(model, mem, KnnMoeOptions(memory=str(mem.path), index=name, nprobe=args.nprobe))
                build_s = time.perf_counter() - start
                lr = retriever.layers[layer]
                # the layer is timed right next to the search
                with torch.no_grad():
                    layer_s = median_seconds(lambda: model(ids), args.reps)
                search_s = median_seconds(lambda: lr.search(q, 1), args.reps)
                hook_s = median_seconds(lambda: retriever(site, q, z), args.reps)
                stages = stage_ms(lr, q, args.reps) if args.stages else {}
            dist2, found = lr.search(q, 1)
            true = (keys[found[:, 0]].float() - q).pow(2).sum(-1)  # the returned key's true squared distance
            _, raw = knn_index.search(lr.index, q.numpy(), 1)  # the index alone, before any re-rank
            ratio = (true / exact_d.clamp_min(1e-12)).sqrt()  # distance, not squared
            rows.append({
                "keys": n, "index": name, "factory": lr.factory,
                "nprobe": lr.plan.nprobe if "IVF" in lr.factory else None,
                "rerank": lr.plan.rerank, "setup_s": round(build_s, 1),
                "layer_ms": round(1000 * layer_s, 1), "search_ms": round(1000 * search_s, 2),
                "hook_ms": round(1000 * hook_s, 2), **stages,
                "us_per_token": round(1e6 * search_s / q.shape[0], 2),
                "pct_of_layer": round(100 * search_s / layer_s, 2),
                "hook_pct_of_layer": round(100 * hook_s / layer_s, 2),
                "bytes_per_key": round(knn_index.index_bytes(lr.cpu_index) / n, 1) if lr.cpu_index else None,
                "raw_recall_at_1": round((torch.from_numpy(raw[:, 0]) == exact_ids).float().mean().item(), 3),
                "recall_at_1": round((found[:, 0] == exact_ids).float().mean().item(), 3),
                "dist_ratio_mean": round(ratio.mean().item(), 4),
                "dist_ratio_p95": round(ratio.quantile(0.95).item(), 4),
                # what retrieval is handed against the true distance of the same key (1 for re-ranked indexes)
                "returned_over_true": round((dist2[:, 0] / true.clamp_min(1e-12)).sqrt().mean().item(), 4),
                **load.record,
            })
            print(rows[-1], flush=True)
            if args.score_dtypes and lr.plan.rerank and not lr.on_device:
                score_rows.extend(score_dtype_figures(lr, q, exact_d, exact_ids, n, name, args.reps))
            del retriever, lr
        del mem
    return rows, score_rows


def toy_figures(args) -> list[dict]:
    """Accuracy on the toy demo's shifted domain: stock, and kNN-MoE with each index over one shared memory."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from knnmoe_eval.experiments import toy

    toy_dir = toy.train_or_load(args.toy_cache, progress=False)
    tm = TaskManager(include_path=str(REPO / "tasks" / "toy"), include_defaults=False,
                     metadata={"toy_dir": str(toy_dir)})

    def acc(model: str, model_args: str, task: str = "knnmoe_toy_shift") -> float:
        out = simple_evaluate(model=model, model_args=f"pretrained={toy_dir},dtype=float32,{model_args}".rstrip(","),
                              tasks=[task], device="cpu", batch_size=64, task_manager=tm, verbosity="WARNING")
        return out["results"][task]["acc,none"]

    rows = [{"index": "stock (hf)", "keys": 0, "acc": acc("hf", "")}]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        mem = Path(tmp) / "toy_memory"
        simple_evaluate(model="hf-knnmoe", model_args=f"pretrained={toy_dir},dtype=float32,mode=build,memory={mem},"
                        f"positions={args.toy_positions}", tasks=["knnmoe_toy_shift_ref"], device="cpu",
                        batch_size=64, task_manager=tm, verbosity="WARNING")
        n = json.loads((mem / "manifest.json").read_text())["layers"]
        n = next(iter(n.values()))["num_keys"]
        for name in args.indexes:
            rows.append({"index": name, "keys": n,
                         "acc": acc("hf-knnmoe", f"memory={mem},index={name},nprobe={args.nprobe}")})
        if args.prune or args.dedup:
            from transformers import AutoModelForCausalLM

            from knnmoe_eval.core.prune import prune_memory

            model = AutoModelForCausalLM.from_pretrained(toy_dir, dtype=torch.float32)
            settings = [(c, None) for c in args.prune] + [(None, r) for r in args.dedup]
            for i, (min_change, dedup) in enumerate(settings):
                pruned, counts = prune_memory(mem, Path(tmp) / f"pruned{i}", model, min_change, dedup)
                label = "exact, pruned " + (f"min_change={min_change}" if dedup is None else f"dedup={dedup}")
                rows.append({"index": label, "keys": min(after for _, after in counts.values()),
                             "acc": acc("hf-knnmoe", f"memory={pruned}")})
    exact = next(r["acc"] for r in rows if r["index"] == "exact")
    for r in rows:
        r["acc"] = round(r["acc"], 4)
        r["points_vs_exact"] = round(100 * (r["acc"] - exact), 2)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--indexes", nargs="+", default=["exact", "ivfpq", "ivfpq_rerank", "hnsw"])
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default: each index's own)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per forward (the batch searched at once)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-toy", dest="toy", action="store_false")
    p.add_argument("--toy-cache", type=Path, default=REPO / ".cache" / "toy")
    p.add_argument("--prune", type=float, nargs="*", default=[0.05, 0.2],
                   help="toy memory pruned with these min_change values (knnmoe_eval.core.prune), evaluated exact")
    p.add_argument("--dedup", type=float, nargs="*", default=[0.5], help="toy memory pruned with these dedup radii")
    p.add_argument("--no-wide", dest="wide", action="store_false", help="toy demo figures only")
    p.add_argument("--toy-positions", default="answer", help="positions=... of the toy memory build")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep memories (and their trained indexes) here and reuse them (default: a temporary dir)")
    p.add_argument("--prepare", action="store_true", help="only write the memories into --workdir")
    p.add_argument("--no-stages", dest="stages", action="store_false", help="skip the per-stage timings")
    p.add_argument("--score-dtypes", action="store_true",
                   help="also time the re-rank with fp32, fp16 and bf16 ranking products, with recall and distances")
    p.add_argument("--allow-load", action="store_true", help="measure even when other processes are busy")
    p.add_argument("--json", type=Path, default=Path("results/perf_index.json"))
    p.add_argument("--quick", action="store_true", help="10k keys, 2 repetitions")
    args = p.parse_args()
    if args.quick:
        args.keys, args.reps = [10_000], 2

    if args.prepare and args.workdir is None:
        raise SystemExit("--prepare writes memories for later runs: give --workdir")
    quiet = None if args.prepare else require_quiet(args.allow_load)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows, score_rows = wide_figures(args, args.workdir or Path(tmp)) if args.wide else ([], [])
        toy_rows = toy_figures(args) if args.toy and not args.prepare else []
    if args.prepare:
        print(f"memories written to {args.workdir}")
        return
    out = {"model": {"family": "olmoe", "layers": 1, **WIDE}, "tokens": args.tokens, "nprobe": args.nprobe,
           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_at_start": quiet,
           "wide": rows, "score_dtypes": score_rows, "toy": toy_rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    if rows:
        print(f"\n{args.tokens} tokens per search, {out['threads']} threads; layer_ms: the MoE layer's forward")
        print(ratio_table(rows, ["keys", "index", "factory", "nprobe", "setup_s", "layer_ms", "us_per_token",
                                 "pct_of_layer", "hook_pct_of_layer", "bytes_per_key", "raw_recall_at_1",
                                 "recall_at_1", "dist_ratio_mean", "dist_ratio_p95", "returned_over_true",
                                 "others_cores"]))
        stage_cols = ["pca_ms", "coarse_ms", "scan_ms", "rerank_ms"]
        print("\nwhere the search goes (ms for the whole batch, each stage timed alone; hook = search + mixing)")
        print(ratio_table([{c: r.get(c, "-") for c in ["keys", "index", "search_ms", *stage_cols, "hook_ms"]}
                           for r in rows], ["keys", "index", "search_ms", *stage_cols, "hook_ms"]))
    if score_rows:
        print("\nre-rank ranking products by dtype (the kept neighbours' distances are exact in every case)")
        print(ratio_table(score_rows, ["keys", "index", "score_dtype", "rerank_ms", "recall_at_1",
                                       "dist_ratio_mean", "dist_ratio_p95", "others_cores"]))
    if toy_rows:
        print("\ntoy demo, knnmoe_toy_shift accuracy")
        print(ratio_table(toy_rows, ["index", "keys", "acc", "points_vs_exact"]))
    print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
