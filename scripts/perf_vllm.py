"""Throughput of `vllm-knnmoe` against `vllm` and against `hf-knnmoe`, on the same model and prompts, in one run.

For each memory size and index: loglikelihood tokens/s (prompts scored with prompt_logprobs, as lm-eval's
`vllm` does) and greedy generation tokens/s, for vllm-knnmoe and for stock vLLM run the same way
(enforce_eager, which vllm-knnmoe imposes) and, unless --quick, stock vLLM with its defaults (torch.compile and,
on a GPU, CUDA graphs: the speed people get from `--model vllm`). Then hf-knnmoe on the same prompts. Memories
hold synthetic clustered keys (perf_overhead.synthetic_keys) written for the model; their trained indexes are
saved inside them, so the timed runs exclude training. Prefix caching is off so that a repeated prompt costs the
same each time. Runs unchanged on a GPU machine (install `vllm` and faiss-gpu there).

    python scripts/perf_vllm.py --quick                         # CPU check: tiny OLMoE, 10k keys, exact + ivfpq
    python scripts/perf_vllm.py --pretrained allenai/OLMoE-1B-7B-0924 --dtype bfloat16   # on a GPU

Engines start in spawned processes, hence the `__main__` guard.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_overhead import make_lm, random_memory, ratio_table  # noqa: E402

VLLM_TINY = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64)  # vLLM CPU: head_dim 64


def texts(n: int, chars: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_lowercase + " ") for _ in range(chars)) for _ in range(n)]


def engine(pretrained: str, args, eager: bool = True, **knn):
    """lm-eval's `vllm` (no knn arguments; eager=False leaves vLLM's compilation defaults) or `vllm-knnmoe`."""
    import lm_eval.models  # noqa: F401  (registers `vllm` before ours)
    from lm_eval.models.vllm_causallms import VLLM

    from knnmoe_eval.harness.vllm_lm import KnnMoeVLLM

    kw = dict(dtype=args.dtype, max_model_len=args.max_len, enable_prefix_caching=False, seed=0)
    if knn:
        return KnnMoeVLLM(pretrained, **kw, **knn)
    return VLLM(pretrained, **kw, **({"enforce_eager": True} if eager else {}))


def shutdown(lm) -> None:
    lm.model.llm_engine.engine_core.shutdown()
    del lm.model
    gc.collect()


def timed_vllm(lm, score: list[list[int]], prompts: list[list[int]], gen: int) -> tuple[float, float]:
    """(loglikelihood tokens/s, generated tokens/s), after one untimed pass of each."""
    from vllm import SamplingParams, TokensPrompt

    ll = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0)
    greedy = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    rates = []
    for seqs, params, count in ((score, ll, lambda outs: sum(map(len, score))),
                                (prompts, greedy, lambda outs: sum(len(o.outputs[0].token_ids) for o in outs))):
        batch = [TokensPrompt(prompt_token_ids=s) for s in seqs]
        lm.model.generate(batch, params, use_tqdm=False)
        start = time.perf_counter()
        outs = lm.model.generate(batch, params, use_tqdm=False)
        rates.append(count(outs) / (time.perf_counter() - start))
    return rates[0], rates[1]


def timed_hf(lm, score_texts: list[tuple[str, str]], prompt_texts: list[str], gen: int, tokens: int):
    from lm_eval.api.instance import Instance

    ll = [Instance("loglikelihood", {}, pair, 0, ("bench", i, 1)) for i, pair in enumerate(score_texts)]
    lm.loglikelihood(ll[:1], disable_tqdm=True)
    start = time.perf_counter()
    lm.loglikelihood(ll, disable_tqdm=True)
    ll_rate = tokens / (time.perf_counter() - start)
    until = {"until": ["\x00"], "max_gen_toks": gen, "do_sample": False}
    reqs = [Instance("generate_until", {}, (t, until), 0, ("bench", i, 1)) for i, t in enumerate(prompt_texts)]
    start = time.perf_counter()
    outs = lm.generate_until(reqs, disable_tqdm=True)
    return ll_rate, sum(len(lm.tok_encode(o)) for o in outs) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", default=None, help="model path or hub id (default: a tiny random OLMoE)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000], help="keys per layer")
    p.add_argument("--indexes", nargs="+", default=["exact", "ivfpq"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--score-chars", type=int, default=200, help="characters per scored text")
    p.add_argument("--gen", type=int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="hf-knnmoe requests per forward")
    p.add_argument("--quick", action="store_true", help="10k keys, 8 prompts, no compiled stock run")
    p.add_argument("--json", type=Path, default=Path("results/perf_vllm.json"))
    args = p.parse_args()
    if args.quick:
        args.keys, args.prompts = [10_000], 8

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from knnmoe_eval.testing import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        pretrained = args.pretrained or str(save_tiny("olmoe", Path(tmp) / "olmoe", max_position_embeddings=1024,
                                                      **VLLM_TINY))
        tok = AutoTokenizer.from_pretrained(pretrained)
        score_texts = [(t[: len(t) // 2], t[len(t) // 2 :]) for t in texts(args.prompts, args.score_chars, 0)]
        prompt_texts = texts(args.prompts, 32, 1)
        score = [tok(c + x).input_ids for c, x in score_texts]
        prompts = [tok(t).input_ids for t in prompt_texts]
        tokens = sum(map(len, score))
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=getattr(torch, args.dtype))
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        memories = {n: random_memory(Path(tmp) / f"mem{n}", model, n) for n in args.keys}

        rows = []
        stock_runs = [("vllm (enforce_eager)", True)] + ([] if args.quick else [("vllm (default)", False)])
        for name, eager in stock_runs:
            lm = engine(pretrained, args, eager)
            ll, gen = timed_vllm(lm, score, prompts, args.gen)
            shutdown(lm)
            rows.append({"model": name, "keys": 0, "index": "-", "ll_tok_s": round(ll, 1), "gen_tok_s": round(gen, 1)})
        base = rows[0]
        for n, mem in memories.items():
            for index in args.indexes:
                start = time.perf_counter()
                lm = engine(pretrained, args, memory=str(mem), index=index, verify=False)
                setup = time.perf_counter() - start
                ll, gen = timed_vllm(lm, score, prompts, args.gen)
                shutdown(lm)
                rows.append({"model": "vllm-knnmoe", "keys": n, "index": index, "setup_s": round(setup, 1),
                             "ll_tok_s": round(ll, 1), "gen_tok_s": round(gen, 1)})
        hf = make_lm(model, args.batch_size, memory=str(memories[args.keys[0]]), index=args.indexes[-1], verify=False)
        ll, gen = timed_hf(hf, score_texts, prompt_texts, args.gen, tokens)
        rows.append({"model": "hf-knnmoe", "keys": args.keys[0], "index": args.indexes[-1],
                     "ll_tok_s": round(ll, 1), "gen_tok_s": round(gen, 1)})
    for r in rows:
        r.setdefault("setup_s", "-")
        r["ll_vs_vllm"] = round(r["ll_tok_s"] / base["ll_tok_s"], 3)
        r["gen_vs_vllm"] = round(r["gen_tok_s"] / base["gen_tok_s"], 3)
    out = {"pretrained": args.pretrained or "tiny olmoe (hidden 128, 2 layers, 8 experts)", "dtype": args.dtype,
           "score_tokens": tokens, "prompts": args.prompts, "gen_tokens_per_prompt": args.gen,
           "device": "cuda" if torch.cuda.is_available() else "cpu", "runs": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"{tokens} scored tokens, {args.prompts} prompts x {args.gen} generated tokens, {out['device']}")
    print(ratio_table(rows, ["model", "keys", "index", "setup_s", "ll_tok_s", "gen_tok_s", "ll_vs_vllm",
                             "gen_vs_vllm"]))
    print(f"figures: {args.json}; ratios are against vllm with enforce_eager, as vllm-knnmoe runs")


if __name__ == "__main__":
    main()
