"""Diagnostic for the toy domain shift (knnmoe_eval.experiments.toy): is it real, and can routing alone fix it?

Prints, for the cached toy model:
  1. stock accuracy through lm-eval (`simple_evaluate(model="hf")`) on knnmoe_toy_indomain and knnmoe_toy_shift;
  2. oracle routing: the shifted item scored with the router logits the model produces when the same text carries
     the marker of the domain whose rule answers the question (query position only, every layer); every other
     activation is the shifted item's own, so this changes routing and nothing else. And the DEMix oracle: the
     query position routed, at every layer, to the experts the toy's routing supervision gave that domain;
  3. per-item router offsets optimized on the gold answer (30 Adam steps, experts frozen): how far a
     per-item routing change gets when it follows the model's own (sparse top-k) gradient;
  4. router-only fine-tuning on shift_ref (everything but `mlp.gate` frozen), scored through lm-eval on both
     splits: a learned routing change fixes the shift; a global one may cost in-domain accuracy;
  5. whether a memory keyed by router inputs can find the right routing: 1-NN from shift_test to shift_ref keys
     (per layer), how often the neighbour needs the same source domain, has the same query symbol, and (what
     `shift="pair"` also reads) the same symbol before it.

    OMP_NUM_THREADS=1 python scripts/toy_check.py --cache-dir ~/.cache/knnmoe_eval/toy
    OMP_NUM_THREADS=1 python scripts/toy_check.py --toy third --cache-dir .cache   # docs/plus.md's third toy
    OMP_NUM_THREADS=1 python scripts/toy_check.py --quick --cache-dir /tmp/toy   # seconds: the smoke test's run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.core.hooks import hooked_routers
from knnmoe_eval.experiments import toy
from knnmoe_eval.testing import router_inputs, router_logits, small_toy

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks" / "toy"


def routed(model, transform):
    """Every router through `transform(layer, logits) -> logits`, then the model's own gating: the package's one
    router hook (`hooked_routers`), whose gating is the family's (`RouterSite.gate`)."""
    return hooked_routers(find_routers(model), lambda site, h, z: transform(site.layer, z))


def batch(tokenizer, records, marker: str | None = None):
    """Right-padded ids of the contexts (optionally with another marker) and the index of each last token."""
    texts = [(marker + r["context"][1:]) if marker else r["context"] for r in records]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].sum(1) - 1


def score(model, tokenizer, records, transform=None, ids=None, last=None):
    """(accuracy, mean gold NLL) of the multiple choice, scoring the next-token distribution at the query."""
    if ids is None:
        ids, last = batch(tokenizer, records)
    choice_ids = torch.tensor([tokenizer.convert_tokens_to_ids(r["choices"]) for r in records])
    gold = torch.tensor([r["gold"] for r in records])
    ctx = routed(model, transform) if transform else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        logp = model(ids).logits[torch.arange(len(records)), last].log_softmax(-1)
    picked = logp.gather(1, choice_ids)  # (n_items, n_choices)
    acc = (picked.argmax(1) == gold).float().mean().item()
    return acc, -picked.gather(1, gold[:, None]).mean().item()


def lm_eval_acc(pretrained: Path, toy_dir: Path, tasks: list[str]) -> dict[str, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={pretrained},dtype=float32",
        tasks=tasks,
        device="cpu",
        batch_size=64,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                                 metadata={"toy_dir": str(toy_dir)}),
        verbosity="WARNING",
    )
    return {t: out["results"][t]["acc,none"] for t in tasks}


def oracle_routing(model, tokenizer, records, rules):
    """Accuracy when the query position is routed as under the marker of the domain whose rule answers it."""
    correct = 0.0
    for d, marker in enumerate(rules.markers):
        group = [r for r in records if rules.answer_source(r) == d]
        if not group:
            continue
        ids, last = batch(tokenizer, group, marker)
        recorded = router_logits(model, ids)
        rows = torch.arange(len(group))
        # positions in the shifted texts match the swapped ones: only the marker character differs
        flat = rows * ids.shape[1] + last

        def override(i, z):
            z = z.clone()
            z[flat] = recorded[i][flat]
            return z

        correct += score(model, tokenizer, group, override, *batch(tokenizer, group))[0] * len(group)
    return correct / len(records)


def demix_oracle(model, tokenizer, records, rules, config):
    """Accuracy when the query position is routed, at every MoE layer, to the block of experts the toy's routing
    supervision (`toy._route_loss`) trained for the domain whose rule answers it (the stock logits ranked within
    the block, so the family's gating picks its top-k there)."""
    ids, last = batch(tokenizer, records)
    flat = torch.arange(len(records)) * ids.shape[1] + last
    size = config.n_experts // config.n_domains
    block = torch.tensor([rules.answer_source(r) for r in records])  # (n,)
    owned = (torch.arange(config.n_experts)[None, :] // size) == block[:, None]  # (n, E)

    def override(i, z):
        z = z.clone()
        z[flat] = z[flat].masked_fill(~owned, float("-inf")).to(z.dtype)
        return z

    return score(model, tokenizer, records, override, ids, last)[0]


def optimized_offsets(model, tokenizer, records, steps: int = 30, lr: float = 0.1):
    """Accuracy after optimizing a separate router-logit offset per item, layer and position on its gold NLL."""
    ids, last = batch(tokenizer, records)
    n_layers, n_experts = len(model.model.layers), find_routers(model)[0].num_experts
    delta = torch.zeros(n_layers, ids.numel(), n_experts, requires_grad=True)
    rows = torch.arange(len(records))
    gold = torch.tensor([tokenizer.convert_tokens_to_ids(r["answer"]) for r in records])
    opt = torch.optim.Adam([delta], lr=lr)
    for p in model.parameters():
        p.requires_grad_(False)
    with routed(model, lambda i, z: z + delta[i]):
        for _ in range(steps):
            # items do not interact (causal attention within a row, per-token experts): one summed loss is exact
            nll = F.cross_entropy(model(ids).logits[rows, last], gold, reduction="sum")
            opt.zero_grad()
            nll.backward()
            opt.step()
    return score(model, tokenizer, records, lambda i, z: z + delta[i].detach(), ids, last)[0]


def finetune_router(model, tokenizer, records, steps: int = 200, lr: float = 1e-2):
    """A copy of `model` whose routers (only) were trained on the references' image tokens."""
    tuned = copy.deepcopy(model)
    for name, p in tuned.named_parameters():
        p.requires_grad_(name.endswith("mlp.gate.weight"))
    texts = [r["text"] for r in records]
    ids = tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]
    labels = ids[:, 1:].masked_fill(~toy._answer_mask(texts, ids.shape[1])[:, 1:], -100)
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    tuned.train()
    for _ in range(steps):
        logits = tuned(ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tuned.eval()


def nearest_neighbour_domains(model, tokenizer, refs, tests, rules):
    """Per layer: shares of test queries whose nearest reference key (router input) needs the same source domain,
    has the same query symbol and the same symbol before it (three lists)."""

    def keys(records):
        ids, last = batch(tokenizer, records)
        flat = torch.arange(len(records)) * ids.shape[1] + last
        return [h[flat] for _, h in sorted(router_inputs(model, ids).items())]

    labels = {"domain": rules.answer_source, "query": lambda r: r["query"],
              "previous": lambda r: toy.previous_symbol(r) or r["query"]}
    ref_labels = {name: [f(r) for r in refs] for name, f in labels.items()}
    test_labels = {name: [f(r) for r in tests] for name, f in labels.items()}
    out = {name: [] for name in labels}
    for ref_keys, test_keys in zip(keys(refs), keys(tests)):
        nn = torch.cdist(test_keys, ref_keys).argmin(1).tolist()
        for name in labels:
            same = [ref_labels[name][j] == t for j, t in zip(nn, test_labels[name])]
            out[name].append(sum(same) / len(same))
    return out["domain"], out["query"], out["previous"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "knnmoe_eval" / "toy"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--toy", choices=("readme", "second", "third"), default="readme",
                        help="readme: ToyConfig(); second, third: docs/plus.md's SECOND_TOY, THIRD_TOY")
    parser.add_argument("--quick", action="store_true",
                        help="knnmoe_eval.testing.small_toy() and 2 steps each: the script runs (seconds), its "
                             "figures mean nothing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    toys = {"readme": toy.ToyConfig(), "second": toy.SECOND_TOY, "third": toy.THIRD_TOY}
    config = small_toy() if args.quick else toys[args.toy]
    steps = {"steps": 2} if args.quick else {}
    toy_dir = toy.train_or_load(args.cache_dir, config)
    rules = toy.make_rules(config)
    model = AutoModelForCausalLM.from_pretrained(toy_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy_dir)
    refs, shift = toy.load_split(toy_dir, "shift_ref"), toy.load_split(toy_dir, "shift_test")
    manifest = json.loads((toy_dir / toy.TOY_JSON).read_text())
    print(f"toy dir: {toy_dir}  (trained in {manifest['train_seconds']} s on {manifest['train_threads']} threads)")
    both = ["knnmoe_toy_indomain", "knnmoe_toy_shift"]

    stock = lm_eval_acc(toy_dir, toy_dir, both)
    rows = [("stock (lm-eval)", stock["knnmoe_toy_indomain"], stock["knnmoe_toy_shift"])]
    rows.append(("stock (direct scoring)", None, score(model, tokenizer, shift)[0]))
    rows.append(("oracle routing, query position", None, oracle_routing(model, tokenizer, shift, rules)))
    rows.append(("DEMix oracle, query position", None, demix_oracle(model, tokenizer, shift, rules, config)))
    rows.append(("per-item router offsets, 30 Adam steps", None, optimized_offsets(model, tokenizer, shift, **steps)))
    tuned = finetune_router(model, tokenizer, refs, **steps)
    with tempfile.TemporaryDirectory() as tmp:
        tuned.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        acc = lm_eval_acc(Path(tmp), toy_dir, both)
    rows.append(("router-only fine-tune on shift_ref (lm-eval)", acc["knnmoe_toy_indomain"], acc["knnmoe_toy_shift"]))

    print(f"{'routing':<46} {'in-domain':>9} {'shift':>7}")
    for name, indomain_acc, shift_acc in rows:
        shown = "-" if indomain_acc is None else f"{indomain_acc:.3f}"
        print(f"{name:<46} {shown:>9} {shift_acc:>7.3f}")
    for what, shares in zip(("the same source domain", "the same query symbol", "the same symbol before it"),
                            nearest_neighbour_domains(model, tokenizer, refs, shift, rules)):
        shown = "  ".join(f"{x:.3f}" for x in shares)
        print(f"1-NN router input finds a reference with {what}, per layer: {shown}")


if __name__ == "__main__":
    main()
