"""Memory-build throughput (`hf-knnmoe` mode=build) against a plain forward+backward, measured in one run.

Same tiny-but-wide MoE as bench_overhead.py (hidden 2048, 64 experts of width 1024, top-8, 2 layers), same
loglikelihood requests. The build side is lm-eval's `loglikelihood` of `hf-knnmoe` in mode=build, timed end to
end (tokenization, forward, the joint gradient on every router's logits, keys and values gathered, the memory
written). The baseline runs the same padded batches through forward + backward of the same answer-token NLL with
the weights frozen and the gradient taken at the input embeddings: the least any gradient-based build must do.
Goal: build >= 0.8x the baseline.

    OMP_NUM_THREADS=2 python scripts/bench_build.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import WIDE, make_lm, n_tokens, ratio_table, requests, wide_model  # noqa: E402


def forward_backward_seconds(model, reqs, batch_size: int) -> float:
    """Forward + backward of the continuation NLL on the same batches, weights frozen, grad at the embeddings."""
    from knnmoe_eval.tiny import make_tokenizer

    tok = make_tokenizer()
    for p in model.parameters():
        p.requires_grad_(False)
    batches = []
    for b in range(0, len(reqs), batch_size):
        chunk = reqs[b : b + batch_size]
        ctx = [tok(r.args[0])["input_ids"] for r in chunk]  # BOS + context
        cont = [tok(r.args[1], add_special_tokens=False)["input_ids"] for r in chunk]
        seqs = [c + a for c, a in zip(ctx, cont)]
        width = max(len(s) for s in seqs) - 1
        inputs = torch.zeros(len(seqs), width, dtype=torch.long)
        targets = torch.zeros(len(seqs), width, dtype=torch.long)
        scored = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, (s, a) in enumerate(zip(seqs, cont)):
            inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
            targets[i, : len(s) - 1] = torch.tensor(s[1:])
            scored[i, len(s) - 1 - len(a) : len(s) - 1] = True
        batches.append((inputs, targets, scored))
    start = time.perf_counter()
    for inputs, targets, scored in batches:
        embeds = model.get_input_embeddings()(inputs).detach().requires_grad_(True)
        logp = F.log_softmax(model(inputs_embeds=embeds).logits.float(), -1).gather(-1, targets[..., None])[..., 0]
        loss = (-(logp * scored).sum(-1) / scored.sum(-1)).sum()
        torch.autograd.grad(loss, embeds)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--context", type=int, default=120, help="context characters (= tokens) per request")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad", default="paper", help="build gradient: paper | dense")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("results/bench_build.json"))
    p.add_argument("--quick", action="store_true", help="4 requests of 56 tokens")
    args = p.parse_args()
    if args.quick:
        args.requests, args.context = 4, 48

    model = wide_model(args.layers)
    reqs = requests(args.requests, args.context)
    tokens = n_tokens(reqs)
    forward_backward_seconds(model, reqs[: args.batch_size], args.batch_size)  # warm-up
    base_s = forward_backward_seconds(model, reqs, args.batch_size)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        lm = make_lm(model, args.batch_size, memory=f"{tmp}/m", mode="build", grad=args.grad)
        start = time.perf_counter()
        lm.loglikelihood(reqs, disable_tqdm=True)
        build_s = time.perf_counter() - start
    rows = [
        {"side": "forward+backward", "seconds": round(base_s, 2), "tok_s": round(tokens / base_s, 1), "ratio": 1.0},
        {"side": f"build (grad={args.grad})", "seconds": round(build_s, 2), "tok_s": round(tokens / build_s, 1),
         "ratio": round(base_s / build_s, 3)},
    ]
    out = {"model": {"family": "olmoe", "layers": args.layers, **WIDE}, "tokens": tokens,
           "threads": torch.get_num_threads(), "goal_ratio": 0.8, "runs": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"{tokens} tokens, {out['threads']} threads")
    print(ratio_table(rows, ["side", "seconds", "tok_s", "ratio"]))
    print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
