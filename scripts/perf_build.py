"""Memory-build throughput (`hf-knnmoe` mode=build) against a plain forward+backward, measured in one run.

Same tiny-but-wide MoE as perf_overhead.py (hidden 2048, 64 experts of width 1024, top-8, 2 layers), same
loglikelihood requests. The build side is lm-eval's `loglikelihood` of `hf-knnmoe` in mode=build, timed end to
end (tokenization, forward, the joint gradient on every router's logits, keys and values gathered, the memory
written). The baseline runs the same padded batches through forward + backward of the same answer-token NLL with
the weights frozen and the gradient taken at the input embeddings: the least any gradient-based build must do.
Goal: build >= 0.8x the baseline.

`--vs-sft` instead times, on the same model instance and the same references (a context of --context tokens and a
one-token answer, as a multiple-choice prompt), back to back: the `hf-knnmoe` build pass with preset=plus and no
calibration text (so the build samples its probe), as `lm.builder.wall_s` after lm-eval's `loglikelihood` in
mode=build, the way demo.py times it; then router-only SFT's training on the same sequences with
`experiments/sft.py`'s own code and defaults (`trainable_model`, then `train_epoch` per epoch: AdamW, 3 epochs,
batch 16, the 85/15 split, validation after each epoch: exactly what SFT's `wall_time_s` counts). Both sides run
at this process's thread count (`train_sft` itself pins the CPU to one thread, for reproducibility, not speed).
The probe's bound is lifted (probe_bound=1): a random model's first layer admits its whole probe, and the refusal
would stop the build before the memory is written; the probe is sampled and checked all the same.
Goal: plus no slower than SFT (ratio SFT/plus >= 1).
`--vs-sft --toy readme|second|third` times the same two sides on a trained toy of docs/plus.md (through lm-eval:
the build of `knnmoe_toy_shift_ref` with batch 32, as demo.py builds it, with and without calibration text; SFT
through `train_sft` itself, at the toy's router learning rate), `--reps` rounds after a warm-up round. A toy
times the framework (every forward is a few milliseconds of Python), not the model.

`--peak-memory` instead measures the build step's peak resident memory on a tiny OLMoE with Qwen3's 151,936-token
vocabulary, each variant in a fresh process: log-probabilities at the scored positions only (the build) against
the full-vocabulary fp32 logits of the whole batch (what the build computed before).

    OMP_NUM_THREADS=2 python scripts/perf_build.py --quick
    OMP_NUM_THREADS=2 python scripts/perf_build.py --peak-memory
    OMP_NUM_THREADS=2 python scripts/perf_build.py --vs-sft --layers 2 --requests 64 --context 200
    OMP_NUM_THREADS=1 python scripts/perf_build.py --vs-sft --toy readme --reps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_load import Load, require_quiet  # noqa: E402
from perf_overhead import WIDE, make_lm, n_tokens, ratio_table, requests, wide_model  # noqa: E402


def forward_backward_seconds(model, reqs, batch_size: int) -> float:
    """Forward + backward of the continuation NLL on the same batches, weights frozen, grad at the embeddings."""
    from knnmoe_eval.testing import make_tokenizer

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


def peak_memory_child(variant: str, batch: int, length: int, vocab: int) -> None:
    """One build step in this (fresh) process; prints the growth of peak RSS over the loaded model, in MiB."""
    from knnmoe_eval.core import gradient
    from knnmoe_eval.core.routers import find_routers
    from knnmoe_eval.testing import make_tiny_model

    model = make_tiny_model("olmoe", vocab_size=vocab)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(4, vocab, (batch, length), generator=gen)
    targets = torch.randint(4, vocab, (batch, length), generator=gen)
    answer = torch.zeros(batch, length, dtype=torch.bool)
    answer[:, -1] = True  # a one-token answer, as in every multiple-choice benchmark
    if variant == "full-vocabulary logits":
        def full(model, inputs, targets, needed):
            logits = model(inputs).logits.float()  # (b, T, V)
            logp = F.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            cols = torch.arange(inputs.shape[1])
            return logp, logits.argmax(-1) == targets, cols

        gradient.target_logprobs = full
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gradient.optimise_logits(model, find_routers(model), inputs, targets, answer, answer, eta=1.0)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)


def peak_memory(batch: int, length: int, vocab: int) -> None:
    rows = []
    for variant in ("full-vocabulary logits", "scored positions only"):
        out = subprocess.run([sys.executable, __file__, "--peak-memory-child", variant, "--batch-size", str(batch),
                              "--context", str(length), "--vocab", str(vocab)], capture_output=True, text=True,
                             check=True)
        rows.append({"variant": variant, "peak MiB over the model": round(float(out.stdout.split()[-1]), 1)})
    for row in rows:
        row["ratio"] = round(row["peak MiB over the model"] / rows[0]["peak MiB over the model"], 3)
    print(f"build step, batch {batch} x {length} tokens, vocabulary {vocab}, {torch.get_num_threads()} threads")
    print(ratio_table(rows, ["variant", "peak MiB over the model", "ratio"]))


def vs_sft(args) -> None:
    """The plus build pass against router-only SFT's training, on one model and one set of references."""
    from knnmoe_eval.experiments.sft import SftSettings, split, tokenize, train_epoch, trainable_model

    quiet = require_quiet(args.allow_load)
    model = wide_model(args.layers)
    reqs = requests(args.requests, args.context, continuation_chars=1)  # the answer: one token
    tokens = n_tokens(reqs)
    forward_backward_seconds(model, reqs[: args.batch_size], args.batch_size)  # warm-up: allocator, threads
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        lm = make_lm(model, args.batch_size, memory=f"{tmp}/m", mode="build", preset="plus", probe_bound=1.0)
        with Load() as build_load:
            start = time.perf_counter()
            lm.loglikelihood(reqs, disable_tqdm=True)
            end_to_end = time.perf_counter() - start
        build_s, probe_s = lm.builder.wall_s, lm.builder.probe_s
        manifest = json.loads(Path(f"{tmp}/m/manifest.json").read_text())

    s = SftSettings(pretrained="the wide model above", tasks=("bench",), method="router")
    train, val = split(tokenize(lm, reqs), s.val_frac, s.seed)  # the build's sequences: the same encode_request
    pad_id = lm.tokenizer.pad_token_id or 0
    sft_model, optimizer, aux_coef = trainable_model(model, s)
    trainable = sum(p.numel() for p in sft_model.parameters() if p.requires_grad)
    epochs = []
    with Load() as sft_load:
        for epoch in range(1, s.epochs + 1):
            start = time.perf_counter()
            train_epoch(sft_model, optimizer, aux_coef, train, val, pad_id, s, epoch)
            epochs.append(time.perf_counter() - start)
    sft_s = sum(epochs)

    rows = [
        {"side": "plus build (probe)", "seconds": round(build_s, 2), "tok_s": round(tokens / build_s, 1),
         "ratio_sft_over_plus": round(sft_s / build_s, 3), **build_load.record},
        {"side": f"router-only SFT ({s.epochs} epochs)", "seconds": round(sft_s, 2), "tok_s": round(tokens / sft_s, 1),
         "ratio_sft_over_plus": 1.0, **sft_load.record},
    ]
    out = {"model": {"family": "olmoe", "layers": args.layers, **WIDE}, "requests": len(reqs), "tokens": tokens,
           "context": args.context, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
           "load_at_start": quiet, "goal": "ratio_sft_over_plus >= 1",
           "plus": {"wall_s": build_s, "probe_s": probe_s, "loglikelihood_s": end_to_end,
                    "batch_size": args.batch_size, "build": manifest["build"]},
           "sft": {"wall_time_s": sft_s, "epoch_s": epochs, "n_train": len(train), "n_val": len(val),
                   "trainable_params": trainable, "aux_loss_coef": aux_coef, "settings": s.record()},
           "runs": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"{len(reqs)} references, {tokens} tokens, {args.layers} layers, {out['threads']} threads")
    print(ratio_table(rows, ["side", "seconds", "tok_s", "ratio_sft_over_plus", "others_cores", "loaded"]))
    print(f"figures: {args.json}")


TOY_ROUTER_LR = 3e-2  # router-only SFT's learning rate on the toys (experiments.runner's router_lr help)


def toy_vs_sft(args) -> list[dict]:
    """The plus build through lm-eval (with and without calibration text) against router-only SFT's training, on
    one of docs/plus.md's toys and its 200 (third toy: 1,200) shifted references; one row per side."""
    import statistics

    import lm_eval
    import lm_eval.tasks
    from demo import ROOT, TOYS

    from knnmoe_eval.experiments import toy
    from knnmoe_eval.experiments.sft import SftSettings, train_sft
    from knnmoe_eval.harness.lm import KnnMoeLM

    quiet = require_quiet(args.allow_load)
    toy_dir = toy.train_or_load(args.toy_cache or ROOT / ".cache", TOYS[args.toy], progress=False)
    metadata = {"toy_dir": str(toy_dir)}
    tm = lm_eval.tasks.TaskManager(include_path=str(ROOT / "tasks" / "toy"), metadata=metadata)
    calibration = str(toy.data_file(toy_dir, "train"))
    probe = {} if args.probe_bound is None else {"probe_bound": args.probe_bound}

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        runs = iter(range(10**6))

        def plus(**extra) -> float:
            lm = KnnMoeLM(pretrained=str(toy_dir), mode="build", memory=f"{tmp}/m{next(runs)}", batch_size=32,
                          device="cpu", preset="plus", **extra)
            lm_eval.simple_evaluate(model=lm, tasks=["knnmoe_toy_shift_ref"], task_manager=tm, verbosity="WARNING")
            return lm.builder.wall_s

        def sft() -> float:
            settings = SftSettings(str(toy_dir), ("knnmoe_toy_shift_ref",), "router", lr=TOY_ROUTER_LR,
                                   include_path=str(ROOT / "tasks" / "toy"), metadata=metadata, dtype="float32")
            return train_sft(settings, f"{tmp}/s{next(runs)}", progress=False)["wall_time_s"]

        sides = {"plus build, calibration text": lambda: plus(calibration=calibration),
                 "plus build, no calibration text (probe)": lambda: plus(**probe),
                 "router-only SFT (3 epochs)": sft}
        seconds = {name: [] for name in sides}
        with Load() as load:
            for rep in range(args.reps + 1):  # round 0 warms up (first forwards, lm-eval's task cache)
                for name, run in sides.items():
                    took = run()
                    if rep:
                        seconds[name].append(took)
    sft_s = statistics.median(seconds["router-only SFT (3 epochs)"])
    return [{"toy": args.toy, "side": name, "seconds": round(statistics.median(s), 3),
             "runs": " ".join(f"{x:.2f}" for x in s), "ratio_sft_over_plus": round(sft_s / statistics.median(s), 3),
             "threads": torch.get_num_threads(), "load_at_start": quiet["others_cores"], **load.record}
            for name, s in seconds.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--context", type=int, default=120, help="context characters (= tokens) per request")
    p.add_argument("--batch-size", type=int, default=None, help="build batch (default 4; --vs-sft: 16, as SFT's)")
    p.add_argument("--grad", default="paper", help="build gradient: paper | dense")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None,
                   help="default results/perf_build.json (--vs-sft: results/perf_build_vs_sft.json)")
    p.add_argument("--quick", action="store_true", help="4 requests of 56 tokens")
    p.add_argument("--peak-memory", action="store_true", help="peak memory of the build step, before/after")
    p.add_argument("--peak-memory-child", help=argparse.SUPPRESS)
    p.add_argument("--vs-sft", action="store_true", help="the plus build pass against router-only SFT's training")
    p.add_argument("--allow-load", action="store_true", help="--vs-sft: measure even when other processes are busy")
    p.add_argument("--toy", choices=("readme", "second", "third"), help="--vs-sft on this toy of docs/plus.md")
    p.add_argument("--toy-cache", type=Path, default=None, help="--toy: where the trained toys are kept (demo.py's)")
    p.add_argument("--reps", type=int, default=3, help="--toy: timed rounds (the median is reported)")
    p.add_argument("--probe-bound", type=float, default=None,
                   help="--toy: the uncalibrated build's probe_bound (default: the preset's)")
    p.add_argument("--vocab", type=int, default=151_936, help="--peak-memory: vocabulary size (Qwen3's)")
    args = p.parse_args()
    if args.batch_size is None:
        args.batch_size = 16 if args.vs_sft else 4
    if args.json is None:
        args.json = Path("results/perf_build_vs_sft.json" if args.vs_sft else "results/perf_build.json")
    if args.vs_sft and args.toy:
        rows = toy_vs_sft(args)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M %Z"), "runs": rows}, indent=2))
        print(ratio_table(rows, ["toy", "side", "seconds", "runs", "ratio_sft_over_plus", "others_cores"]))
        return print(f"figures: {args.json}")
    if args.vs_sft:
        return vs_sft(args)
    if args.peak_memory_child:
        return peak_memory_child(args.peak_memory_child, args.batch_size, args.context, args.vocab)
    if args.peak_memory:
        return peak_memory(args.batch_size, args.context, args.vocab)
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
