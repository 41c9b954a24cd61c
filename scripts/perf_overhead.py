"""End-to-end loglikelihood throughput of `hf-knnmoe` against `hf`, measured in one run on a tiny-but-wide MoE.

The model has OLMoE-1B-7B's layer shape (hidden 2048, 64 experts of width 1024, top-8) with random weights and
2 layers. Both sides are lm-eval LM objects given the same model instance and the same loglikelihood requests,
so they run the same code path and differ only by the routers' kNN hook. Memories hold random clustered keys
(timing does not depend on their content) written with `knnmoe_eval.core.memory.write_memory`; their trained indexes
are saved inside them, so the timed runs exclude training. `hf` is timed right before and right after each kNN
run and the mean of the two is that run's baseline. Every row records the machine's load (`machine_load.py`);
the run refuses to start on a busy machine unless --allow-load.

    OMP_NUM_THREADS=2 python scripts/perf_overhead.py --quick     # ~2 min: 10k keys
    OMP_NUM_THREADS=2 python scripts/perf_overhead.py --keys 100000 --indexes ivfpq ivfpq_rerank --workdir W

Also the shared helpers of perf_index.py and perf_build.py (wide model, synthetic keys, requests).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import tempfile
import time
from pathlib import Path

import torch
from machine_load import Load, require_quiet

WIDE = dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
            num_attention_heads=16, num_key_value_heads=16, head_dim=128)


def wide_model(layers: int = 2):
    from knnmoe_eval.testing import make_tiny_model

    return make_tiny_model("olmoe", num_hidden_layers=layers, max_position_embeddings=1024, **WIDE)


def synthetic_keys(n: int, d: int, seed: int = 0, draw: int | None = None, chunk: int = 65_536) -> torch.Tensor:
    """(n, d) fp16 keys with structure, as router inputs have: 1000 clusters in a 64-dim subspace, plus noise.

    Isotropic random keys would make every approximate index look useless (in 2048 dims all distances are
    alike). `seed` fixes the distribution, `draw` the sample (fresh queries from the keys' distribution).
    Generated in chunks so that 1M keys never need a float32 copy.
    """
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, d, generator=g) / 8
    centres = torch.randn(1000, 64, generator=g) * 2
    if draw is not None:
        g = torch.Generator().manual_seed(draw)
    out = torch.empty(n, d, dtype=torch.float16)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[torch.randint(0, 1000, (m,), generator=g)] + torch.randn(m, 64, generator=g)
        out[start : start + m] = (x @ basis + 0.3 * torch.randn(m, d, generator=g)).half()
    return out


def random_memory(path: Path, model, n: int, seed: int = 0) -> Path:
    from knnmoe_eval.core.memory import write_memory
    from knnmoe_eval.core.routers import find_routers
    from knnmoe_eval.core.signature import model_signature

    sig = model_signature(model, find_routers(model))
    keys = {l: synthetic_keys(n, sig["hidden_size"], seed + l) for l in sig["moe_layers"]}
    values = {l: torch.randn(n, sig["num_experts"], generator=torch.Generator().manual_seed(l)) for l in keys}
    return write_memory(path, keys, values, sig)


def requests(n: int, context_chars: int, continuation_chars: int = 8, seed: int = 0):
    """Loglikelihood requests of random letters (the byte-level tokenizer makes one token per character)."""
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice(string.ascii_lowercase) for _ in range(k))  # noqa: E731
    return [
        Instance("loglikelihood", {}, (text(context_chars), " " + text(continuation_chars - 1)), 0, ("bench", i, 1))
        for i in range(n)
    ]


def n_tokens(reqs) -> int:
    return sum(1 + len(r.args[0]) + len(r.args[1]) for r in reqs)  # BOS + one token per byte


def make_lm(model, batch_size: int, **knn):
    """`hf` (no knn arguments) or `hf-knnmoe` wrapping the already-loaded model."""
    import lm_eval.models  # noqa: F401  (registers `hf` before ours)
    from lm_eval.models.huggingface import HFLM

    from knnmoe_eval.harness.lm import KnnMoeLM
    from knnmoe_eval.testing import make_tokenizer

    cls = KnnMoeLM if knn else HFLM
    return cls(pretrained=model, tokenizer=make_tokenizer(), batch_size=batch_size, max_length=1024, **knn)


def timed_loglikelihood(lm, reqs) -> float:
    start = time.perf_counter()
    lm.loglikelihood(reqs, disable_tqdm=True)
    return time.perf_counter() - start


def ratio_table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(f"{r[c]}") for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(f"{r[c]}".ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000], help="keys per layer")
    p.add_argument("--indexes", nargs="+", default=["exact", "ivfpq", "ivfpq_rerank", "hnsw"])
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default: each index's own)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--context", type=int, default=120, help="context characters (= tokens) per request")
    p.add_argument("--batch-size", type=int, default=4, help="requests per forward (4 x 128 = 512 tokens)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep memories (and their trained indexes) here and reuse them (default: a temporary dir)")
    p.add_argument("--json", type=Path, default=Path("results/perf_overhead.json"))
    p.add_argument("--quick", action="store_true", help="10k keys, 4 requests of 56 tokens")
    p.add_argument("--allow-load", action="store_true", help="measure even when other processes are busy")
    args = p.parse_args()
    quiet = require_quiet(args.allow_load)
    if args.quick:
        args.keys, args.requests, args.context = [10_000], 4, 48

    model = wide_model(args.layers)
    reqs = requests(args.requests, args.context)
    tokens = n_tokens(reqs)
    hf = make_lm(model, args.batch_size)
    timed_loglikelihood(hf, reqs[:1])  # warm-up: allocator, threads
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for n in args.keys:
            mem = workdir / f"mem{n}"
            if not (mem / "manifest.json").exists():  # a kept --workdir also keeps the trained indexes
                random_memory(mem, model, n)
            for name in args.indexes:
                start = time.perf_counter()
                lm = make_lm(model, args.batch_size, memory=str(mem), index=name, nprobe=args.nprobe, verify=False)
                setup = time.perf_counter() - start
                timed_loglikelihood(lm, reqs[:1])
                with Load() as load:  # hf right before and right after the kNN run
                    hf_s = [timed_loglikelihood(hf, reqs)]
                    knn_s = timed_loglikelihood(lm, reqs)
                    hf_s.append(timed_loglikelihood(hf, reqs))
                rows.append({"keys": n, "index": name, "setup_s": round(setup, 1), "seconds": knn_s,
                             "hf_seconds": [round(t, 2) for t in hf_s], "hf_mean": sum(hf_s) / 2, **load.record})
                del lm
    for r in rows:
        hf_s = r.pop("hf_mean")
        r["hf_tok_s"] = round(tokens / hf_s, 1)
        r["tok_s"] = round(tokens / r["seconds"], 1)
        r["ratio_vs_hf"] = round(hf_s / r["seconds"], 3)
        r["overhead_pct"] = round(100 * (r["seconds"] / hf_s - 1), 1)
        r["seconds"] = round(r["seconds"], 2)
    out = {
        "model": {"family": "olmoe", "layers": args.layers, **WIDE},
        "tokens": tokens, "batch_tokens": tokens * args.batch_size // len(reqs),
        "threads": torch.get_num_threads(), "nprobe": args.nprobe,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_at_start": quiet,
        "runs": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"{tokens} tokens per run, {out['batch_tokens']} per forward, {out['threads']} threads")
    print(ratio_table(rows, ["keys", "index", "setup_s", "hf_tok_s", "tok_s", "ratio_vs_hf", "overhead_pct",
                             "others_cores", "loaded"]))
    print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
