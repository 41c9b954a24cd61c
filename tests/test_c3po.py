"""C3PO: NGD lowers the successful neighbours' loss, moves only core experts of critical layers; through lm-eval."""

import json
from dataclasses import replace

import pytest
import torch

from knnmoe_eval.benchmarks.fewshot import TfidfEncoder
from knnmoe_eval.core.build import RefSequence
from knnmoe_eval.core.hooks import hooked_routers
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.experiments.c3po import C3PO, C3POOptions, Pathway, Reference
from knnmoe_eval.testing import make_tiny_model

WORDS = ["alpha beta", "gamma delta", "alpha gamma", "beta delta", "epsilon zeta"]


def references(seed=0):
    g = torch.Generator().manual_seed(seed)
    refs = []
    for i, question in enumerate(WORDS):
        tokens = torch.randint(4, 250, (9,), generator=g).tolist()
        refs.append(Reference(question, RefSequence(("ref", i, 0), tokens[:-1], tokens[1:], n_cont=2)))
    return refs


# C3PO is defined (and its step size set) for softmax-gated routers, as in its paper (OLMoE, DeepSeekMoE): the
# families below. Sigmoid-gated, sparsemixer and linear-attention families are not claimed for it.
C3PO_FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss")


@pytest.mark.parametrize("family", C3PO_FAMILIES)
@pytest.mark.parametrize("layers,core", [(1, 3), (2, 8)])
def test_ngd_lowers_the_neighbours_loss_and_moves_only_core_experts_of_critical_layers(family, layers, core):
    model = make_tiny_model(family)
    sites = find_routers(model)
    opts = C3POOptions(references="unused", mode="build", neighbours=3, layers=layers, core_experts=core, steps=5,
                       lr=10.0)
    method = C3PO(model, sites, references(), TfidfEncoder(), opts, pad_id=0)
    idx, weights = method.neighbours("alpha delta")
    assert len(idx) == 3 and idx[0] in (0, 1, 2, 3) and torch.all(weights > 0)
    tokens = torch.randint(4, 250, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    w0 = method.initial_pathway(tokens)
    w = method.adapt("alpha delta", tokens)
    assert set(w) == {s.layer for s in sites[-layers:]}  # the critical layers: the last `layers`
    assert len(method.last_losses) == 5
    with torch.no_grad():
        assert float(method.loss(w, idx, weights)) < float(method.loss(w0, idx, weights))
    for layer, v in w.items():
        moved = v != w0[layer]
        assert moved.any() and moved.sum() <= core
        assert torch.all(moved <= (w0[layer] >= w0[layer].topk(min(core, 8)).values[-1]))  # only core experts


@pytest.mark.parametrize("family", C3PO_FAMILIES)
def test_pathway_replaces_only_the_answer_positions(family):
    """w changes the routing from `start` on only: the positions before it (which, causally, cannot see the later
    ones) come out as stock, up to the float32 rounding of experts that now see other token groups."""
    model = make_tiny_model(family)
    sites = find_routers(model)
    ids = torch.randint(4, 250, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stock = model(ids).logits
        w = {s.layer: torch.full((8,), 0.0).index_fill_(0, torch.tensor([5, 6]), 50.0) for s in sites}
        with hooked_routers(sites, Pathway(w, batch=2, start=5)):
            moved = model(ids).logits
    torch.testing.assert_close(moved[:, :5], stock[:, :5], rtol=0, atol=1e-6)
    assert (moved[:, 5:] - stock[:, 5:]).abs().amax(-1).min() > 1e-3


def test_generation_routes_the_prompts_last_token_and_every_generated_one():
    """Cached generation with w on the last position of each forward (what `_model_generate` installs) scores
    every step as a forward without cache that routes every position from the prompt's last token on with w."""
    model = make_tiny_model("olmoe")
    sites = find_routers(model)
    prompt = torch.randint(4, 250, (1, 6), generator=torch.Generator().manual_seed(3))
    w = {s.layer: torch.randn(8, generator=torch.Generator().manual_seed(s.layer)) * 5 for s in sites}

    def generate(routing):
        with torch.no_grad(), hooked_routers(sites, routing):
            out = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        return out.sequences, torch.cat(out.logits)  # (1, 10), (4, V)

    ids, cached = generate(Pathway(w, batch=1, start=None))
    _, stock = generate(lambda site, h, z: z)
    with torch.no_grad(), hooked_routers(sites, Pathway(w, batch=1, start=prompt.shape[1] - 1)):
        full = model(ids[:, :-1]).logits[0, prompt.shape[1] - 1 :]  # (4, V): the same four steps, no cache
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)  # a KV cache sums in another order
    assert (cached - stock).abs().amax() > 1e-2


@pytest.mark.e2e
def test_c3po_through_lm_eval_on_the_toy(tmp_path, monkeypatch):
    """The runner's C3PO row end to end on the small toy; NGD lowers a test input's neighbours' loss."""
    from test_toy import SMALL

    from knnmoe_eval.experiments import toy
    from knnmoe_eval.experiments.runner import BENCHMARKS, Runner, Settings

    monkeypatch.setenv("KNNMOE_FEWSHOT_ENCODER", "tfidf")
    toy_dir = str(toy.train_or_load(tmp_path / "toy", replace(SMALL, n_shift_ref=40, n_shift_test=16),
                                    progress=False))
    runner = Runner(Settings(pretrained=toy_dir, out=str(tmp_path / "out"), benchmarks=("toy_shift",), limit=6,
                             ref_limit=40, batch_size=8))
    bench = BENCHMARKS["toy_shift"]
    path = runner.c3po_references(bench)
    saved = json.loads(path.read_text())["references"]
    assert len(saved) == 40 and all(isinstance(r["answered"], bool) for r in saved)
    # the 2-step toy answers (almost) none of its references: call them all successful, to exercise NGD
    path.write_text(json.dumps({"references": [{**r, "answered": True} for r in saved]}))
    lm = runner.c3po_lm(path, steps=3, lr=100.0)
    c3po = runner.scores("c3po", bench, lambda: lm, config={"references": path.name})
    zero = runner.zero_shot(bench)
    assert c3po["doc_ids"] == zero["doc_ids"] and len(c3po["scores"]) == 6
    assert len(lm.method.last_losses) == 3
    diag = lm.get_model_info()["c3po"]["diagnostics"]
    assert diag["successful_references"] == 40 and diag["inputs"] == 6  # once per document, for all its choices
    assert diag["mean_loss_last_step"] < diag["mean_loss_first_step"]
    context = zero["contexts"][0]
    tokens = lm.tok_encode(context)
    idx, weights = lm.method.neighbours(context)
    w0, w = lm.method.initial_pathway(tokens), lm.method.adapt(context, tokens)
    with torch.no_grad():
        assert float(lm.method.loss(w, idx, weights)) < float(lm.method.loss(w0, idx, weights))


@pytest.mark.parametrize("args,error", [
    (dict(references="r.json", neighbors=3), "did you mean 'neighbours'"),
    (dict(references="r.json", mode="build", steps=2.5), "must be an integer"),
    (dict(references="missing.json"), "write it first with mode=build"),
    (dict(references="r.json", mode="build", lr=0), "lr=0.0"),
])
def test_bad_options_are_refused_with_the_fix(args, error):
    from knnmoe_eval import KnnMoeError
    from knnmoe_eval.core.options import split_model_args
    from knnmoe_eval.experiments.c3po import C3POOptions

    with pytest.raises(KnnMoeError, match=error):
        split_model_args(args, set(), C3POOptions, "hf-c3po model_arg")
