"""GPU check: end-to-end cost of kNN-MoE routing (`attach`, exact search) against the stock model, VRAM included,
at 1M keys per MoE layer. Made to run in at most ~8 minutes on one large GPU with nothing but torch,
transformers and this package's core (no lm-eval, no faiss, no files: the model and the keys are synthesized on
the GPU).

The model has OLMoE-1B-7B's shape (16 layers, hidden 2048, 64 experts of width 1024, top-8) with random bf16
weights; each layer's memory holds `--keys` structured synthetic fp16 keys (1000 clusters in a 64-dim subspace
plus noise, as `perf_overhead.synthetic_keys`) and random values. Exact search on a GPU is a torch matmul over
the fp16 keys on the layer's device (`index.TorchExactIndex`), so faiss is not needed; faiss-gpu, if importable,
is only reported. Timings are CUDA-synchronised medians of full forwards of `--batch` x `--tokens` tokens.

    python scripts/gpu_check.py                        # 16 layers x 1M keys: ~64 GiB of keys
    python scripts/gpu_check.py --layers 4 --keys 200000 --reps 2   # a quick smoke run
    python scripts/gpu_check.py --device cpu --layers 1 --keys 5000 --tokens 64 --reps 1  # plumbing, no GPU

Writes $OUT/gpu_check.json (or --json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package's core, without installing it

OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                   num_attention_heads=16, num_key_value_heads=16, head_dim=128)


def model_on(device: torch.device, layers: int, positions: int):
    from transformers import AutoModelForCausalLM

    from knnmoe_eval.testing import tiny_config

    cfg = tiny_config("olmoe", num_hidden_layers=layers, max_position_embeddings=positions, **OLMOE_1B_7B)
    torch.manual_seed(0)
    with device:  # weights initialised on the GPU: no host copy of ~7B parameters
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:  # the GPU image's transformers may predate `dtype` (it was `torch_dtype`)
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    return model.eval()


def synthetic_keys(n: int, d: int, device: torch.device, seed: int, chunk: int = 262_144) -> torch.Tensor:
    """(n, d) fp16 keys on `device`: 1000 clusters in a 64-dim subspace plus isotropic noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    basis = torch.randn(64, d, generator=g, device=device) / 8
    centres = torch.randn(1000, 64, generator=g, device=device) * 2
    out = torch.empty(n, d, dtype=torch.float16, device=device)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[torch.randint(0, 1000, (m,), generator=g, device=device)]
        x = x + torch.randn(m, 64, generator=g, device=device)
        out[start : start + m] = (x @ basis + 0.3 * torch.randn(m, d, generator=g, device=device)).half()
    return out


def gpu_memory(model, n: int, device: torch.device):
    """A Memory held on the GPU (no files): synthetic keys and random values for every MoE layer."""
    from knnmoe_eval.core.memory import LayerMemory, Memory
    from knnmoe_eval.core.routers import find_routers
    from knnmoe_eval.core.signature import model_signature

    sig = model_signature(model, find_routers(model))
    layers = {}
    for layer in sig["moe_layers"]:
        keys = synthetic_keys(n, sig["hidden_size"], device, seed=layer)
        values = torch.randn(n, sig["num_experts"], device=device)
        layers[layer] = LayerMemory(keys, values, {"mean_nn_sq_dist": None, "mean_nn_sq_dist_l2": None})
    manifest = {"model": sig, "layers": {str(l): {"num_keys": n} for l in layers}}
    return Memory(Path("<synthetic, on the GPU>"), manifest, layers)


def timed(fn, reps: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def allocated(device: torch.device, peak: bool = False) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--keys", type=int, default=1_000_000, help="keys per MoE layer")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda:0", help="cpu: check the plumbing only (faiss search, no VRAM)")
    p.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", "results")) / "gpu_check.json")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (or --device cpu for a plumbing check)")
    t0 = time.perf_counter()
    try:
        import faiss

        faiss_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except ImportError:
        faiss_gpu = False

    from knnmoe_eval.core.retrieval import attach

    model = model_on(device, args.layers, args.tokens)
    ids = torch.randint(4, 250, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)).to(device)
    forward = lambda: model(ids)  # noqa: E731
    with torch.no_grad():
        weights = allocated(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stock_s = timed(forward, args.reps, device)
        stock_peak = allocated(device, peak=True)
        setup = time.perf_counter()
        memory = gpu_memory(model, args.keys, device)
        keys_s = time.perf_counter() - setup
        with_memory = allocated(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # sigma: timing does not depend on it (lambda is ~0 here: the random model's router inputs are far from
        # the synthetic keys, and mixing costs the same for any lambda)
        with attach(model, memory, k=args.k, sigma=1.0) as retriever:
            knn_s = timed(forward, args.reps, device)
            knn_peak = allocated(device, peak=True)
            lam = statistics.mean(d["mean_lambda"] for d in retriever.diagnostics().values())
    tokens = args.batch * args.tokens
    gib = 2**30
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "faiss_gpu": faiss_gpu,
        "index": "exact (torch matmul on the GPU, fp16 keys)" if device.type == "cuda" else "exact (faiss, CPU)",
        "layers": args.layers, "keys_per_layer": args.keys,
        "tokens_per_forward": tokens, "k": args.k, "reps": args.reps,
        "stock_ms": round(1000 * stock_s, 1), "knn_ms": round(1000 * knn_s, 1),
        "overhead_pct": round(100 * (knn_s / stock_s - 1), 1),
        "search_us_per_token_and_layer": round(1e6 * (knn_s - stock_s) / tokens / args.layers, 3),
        "vram_weights_gib": round(weights / gib, 2), "vram_memory_gib": round((with_memory - weights) / gib, 2),
        "vram_peak_stock_gib": round(stock_peak / gib, 2), "vram_peak_knn_gib": round(knn_peak / gib, 2),
        "keys_synthesis_s": round(keys_s, 1), "mean_lambda": round(lam, 4),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    for name, value in out.items():
        print(f"{name:32s} {value}")


if __name__ == "__main__":
    main()
