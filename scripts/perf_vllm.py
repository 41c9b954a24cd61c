"""Throughput of `vllm-knnmoe` against plain `vllm` (its defaults), on the same model and prompts, in one run.

For each memory size and index: loglikelihood tokens/s (prompts scored with prompt_logprobs, as lm-eval's
`vllm` does) and greedy generation tokens/s, for `vllm-knnmoe` (compiled, piecewise CUDA graphs on a GPU: its
defaults) and for `vllm` with its defaults (torch.compile and, on a GPU, CUDA graphs: the speed people get from
`--model vllm`), which every ratio is against; `vllm` with enforce_eager is timed too, for reference. The model
has OLMoE-1B-7B's real dimensions (the vendored config `knnmoe_eval/testing_data/configs/`, random weights, cut to
--layers layers, vocabulary 50304 kept): on a tiny model the figures time vLLM's scheduler, not the retrieval.
Memories hold synthetic clustered keys (perf_overhead.synthetic_keys); an index is trained (or loaded) when the
engine attaches the memory, counted in setup_s, never in the timed runs. Prefix caching is off so that a repeated prompt
costs the same each time. Each figure records the machine's load (machine_load.Load). Runs unchanged on a GPU
(install `vllm` and faiss-gpu there; `--pretrained` a real model, `--dtype bfloat16`).

    python scripts/perf_vllm.py --quick --allow-load      # smoke: tiny OLMoE, 10k keys, exact + ivfpq_rerank
    python scripts/perf_vllm.py                           # CPU: OLMoE dims, 2 layers, 10k and 100k keys
    python scripts/perf_vllm.py --layers 16 --dtype bfloat16 --prompts 256   # GPU: the whole OLMoE shape

vLLM's CPU backend reserves VLLM_CPU_KVCACHE_SPACE GiB of KV cache (4 by default, or 92% of the NUMA node on
some builds); the script sets it to 1 unless it is set. Engines start in spawned processes, hence the guard.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import string
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; ignored on a GPU
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_load import Load, require_quiet  # noqa: E402
from perf_overhead import random_memory, ratio_table  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "knnmoe_eval" / "testing_data" / "configs" / (
    "olmoe-1b-7b-0125-instruct.json")
VLLM_TINY = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64)  # vLLM CPU: head_dim 64


def texts(n: int, chars: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_lowercase + " ") for _ in range(chars)) for _ in range(n)]


def real_dims_model(out: Path, layers: int, dtype: str) -> Path:
    """A random-weight OLMoE at the vendored config's dimensions, cut to `layers` layers, with our tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from knnmoe_eval.testing import make_tokenizer

    config = AutoConfig.for_model(**{k: v for k, v in json.loads(CONFIG.read_text()).items()
                                      if k not in ("_name_or_path", "transformers_version", "torch_dtype")})
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


def engine(pretrained: str, args, eager: bool = False, **knn):
    """lm-eval's `vllm` (no knn arguments) or `vllm-knnmoe`, each with vLLM's compilation defaults unless eager."""
    import lm_eval.models  # noqa: F401  (registers `vllm` before ours)
    from lm_eval.models.vllm_causallms import VLLM

    from knnmoe_eval.harness.vllm_lm import KnnMoeVLLM

    kw = dict(dtype=args.dtype, max_model_len=args.max_len, enable_prefix_caching=False, seed=0)
    if eager:
        kw["enforce_eager"] = True
    return KnnMoeVLLM(pretrained, **kw, **knn) if knn else VLLM(pretrained, **kw)


def shutdown(lm) -> None:
    lm.model.llm_engine.engine_core.shutdown()
    del lm.model
    gc.collect()


def timed_vllm(lm, score: list[list[int]], prompts: list[list[int]], gen: int) -> dict:
    """Loglikelihood and generated tokens/s, each after one untimed pass, with the machine's load meanwhile."""
    from vllm import SamplingParams, TokensPrompt

    ll = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0)
    greedy = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    row = {}
    for key, seqs, params, count in (
            ("ll", score, ll, lambda outs: sum(map(len, score))),
            ("gen", prompts, greedy, lambda outs: sum(len(o.outputs[0].token_ids) for o in outs))):
        batch = [TokensPrompt(prompt_token_ids=s) for s in seqs]
        lm.model.generate(batch, params, use_tqdm=False)
        with Load() as load:
            start = time.perf_counter()
            outs = lm.model.generate(batch, params, use_tqdm=False)
            row[f"{key}_tok_s"] = round(count(outs) / (time.perf_counter() - start), 1)
        row[f"{key}_others_cores"] = load.record["others_cores"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", default=None, help="model path or hub id (default: OLMoE dims, random weights)")
    p.add_argument("--layers", type=int, default=2, help="layers of the real-dimension model")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000], help="keys per layer")
    p.add_argument("--indexes", nargs="+", default=["exact", "ivfpq", "ivfpq_rerank"])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--score-chars", type=int, default=128, help="characters (= tokens) per scored text")
    p.add_argument("--gen", type=int, default=16, help="greedy tokens generated per prompt")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--no-eager", action="store_true", help="skip the reference run of vllm with enforce_eager")
    p.add_argument("--quick", action="store_true", help="tiny OLMoE, 10k keys, exact + ivfpq_rerank, 4 prompts")
    p.add_argument("--eager", action="store_true", help="every engine with enforce_eager (the smoke test: no compile)")
    p.add_argument("--allow-load", action="store_true", help="measure even when other processes are busy")
    p.add_argument("--json", type=Path, default=Path("results/perf_vllm.json"))
    if p.parse_known_args()[0].quick:  # --quick changes the defaults; flags given with it still apply
        p.set_defaults(keys=[10_000], indexes=["exact", "ivfpq_rerank"], prompts=4, gen=8, no_eager=True,
                       dtype="float32")
    args = p.parse_args()
    quiet = require_quiet(args.allow_load)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from knnmoe_eval.testing import save_tiny

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        if args.pretrained:
            pretrained, what = args.pretrained, args.pretrained
        elif args.quick:
            pretrained = str(save_tiny("olmoe", Path(tmp) / "olmoe", max_position_embeddings=1024, **VLLM_TINY))
            what = "tiny olmoe (hidden 128, 2 layers, 8 experts)"
        else:
            pretrained = str(real_dims_model(Path(tmp) / "olmoe", args.layers, args.dtype))
            what = f"OLMoE-1B-7B dimensions, random weights, {args.layers} layers ({CONFIG.name})"
        tok = AutoTokenizer.from_pretrained(pretrained)
        score = [tok(t).input_ids for t in texts(args.prompts, args.score_chars, 0)]
        prompts = [tok(t).input_ids for t in texts(args.prompts, 32, 1)]
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=getattr(torch, args.dtype))
        memories = {n: random_memory(Path(tmp) / f"mem{n}", model, n) for n in args.keys}
        del model  # the engines load their own copy
        gc.collect()

        rows = []
        stock = [("vllm (enforce_eager)" if args.eager else "vllm", args.eager)]
        for name, eager in stock + ([] if args.no_eager or args.eager else [("vllm (enforce_eager)", True)]):
            lm = engine(pretrained, args, eager)
            rows.append({"model": name, "keys": 0, "index": "-", **timed_vllm(lm, score, prompts, args.gen)})
            print("measured:", rows[-1], flush=True)  # a long run that is stopped keeps what it measured
            shutdown(lm)
        base = rows[0]
        for n, mem in memories.items():
            for index in args.indexes:
                start = time.perf_counter()
                lm = engine(pretrained, args, args.eager, memory=str(mem), index=index, verify=False)
                setup = time.perf_counter() - start
                row = {"model": "vllm-knnmoe", "keys": n, "index": index, "setup_s": round(setup, 1)}
                rows.append({**row, **timed_vllm(lm, score, prompts, args.gen)})
                print("measured:", rows[-1], flush=True)
                shutdown(lm)
    for r in rows:
        r.setdefault("setup_s", "-")
        r["ll_vs_vllm"] = round(r["ll_tok_s"] / base["ll_tok_s"], 3)
        r["gen_vs_vllm"] = round(r["gen_tok_s"] / base["gen_tok_s"], 3)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    out = {"pretrained": what, "dtype": args.dtype, "score_tokens": sum(map(len, score)), "prompts": args.prompts,
           "gen_tokens_per_prompt": args.gen, "device": gpu or "cpu", "threads": torch.get_num_threads(),
           "quiet_check": quiet, "runs": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"{what}; {out['score_tokens']} scored tokens, {args.prompts} prompts x {args.gen} generated tokens, "
          f"{out['device']}")
    print(ratio_table(rows, ["model", "keys", "index", "setup_s", "ll_tok_s", "gen_tok_s", "ll_vs_vllm",
                             "gen_vs_vllm", "ll_others_cores", "gen_others_cores"]))
    print(f"figures: {args.json}; ratios are against {base['model']}; others_cores: CPU cores "
          "other processes used while the figure was measured (0 on a quiet machine)")


if __name__ == "__main__":
    main()
