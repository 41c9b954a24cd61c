"""Every family's hooked router returns what its stock router returns, bit for bit; changed routers are refused."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from knnmoe_eval import KnnMoeError, KnnMoeOptions, attach
from knnmoe_eval.core.build import MemoryBuilder, tokenize_request
from knnmoe_eval.core.families import FAMILIES, supported
from knnmoe_eval.core.hooks import Rerouted, route
from knnmoe_eval.core.memory import load_memory, write_memory
from knnmoe_eval.core.routers import ULPS, RouterSite, find_routers, unfaithful
from knnmoe_eval.core.signature import model_signature
from knnmoe_eval.testing import TINY, make_tiny_model


def passthrough(site, h, z):
    return z


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def test_every_family_has_a_tiny_model():
    assert set(TINY) == set(FAMILIES) and len(FAMILIES) >= 25


@pytest.mark.equivalence
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_left_alone_get_the_stock_routers_own_output_bit_for_bit(family, dtype):
    """The door's guarantee: untouched rows are the stock router's own output, whatever the restatement computes;
    moved rows go through the restatement (here with the stock logits, so they must be faithful to stock)."""
    model = make_tiny_model(family).to(dtype)
    gen = torch.Generator().manual_seed(1)
    for site in find_routers(model):
        h = (torch.randn(111, site.hidden_size, generator=gen) * 3).to(dtype)  # MoE blocks pass (n_tokens, d)
        args = site.family.args(site.block)
        stock = as_tuple(site.stock(h.clone(), args))
        rows = torch.arange(0, 111, 3)
        for transform in (passthrough, lambda site, h, z: Rerouted(z, rows[:0]), lambda site, h, z: Rerouted(z, rows)):
            ours = as_tuple(route(site, h.clone(), args, transform))
            assert len(ours) == len(stock)
            kept = torch.ones(111, dtype=torch.bool).index_fill(0, rows, False)
            for a, b in zip(ours, stock):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a[kept], b[kept])
            assert unfaithful(tuple(b[rows] for b in stock), tuple(a[rows] for a in ours)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restated_router_and_gating_are_faithful_to_the_stock_router(family, dtype):
    model = make_tiny_model(family).to(dtype)
    gen = torch.Generator().manual_seed(1)
    for site in find_routers(model):
        h = (torch.randn(111, site.hidden_size, generator=gen) * 3).to(dtype)
        args = site.family.args(site.block)
        stock = as_tuple(site.stock(h.clone(), args))
        assert unfaithful(stock, as_tuple(site.output(site.logits(h), h.dtype, args))) is None
        # the gating alone (diagnostics, pruning) against what the MoE block hands its experts
        seen = []
        handle = site.experts.register_forward_pre_hook(lambda m, a: seen.append(a))
        try:
            with torch.no_grad():
                site.block(h.unsqueeze(0))
        finally:
            handle.remove()
        weights, experts = site.gate(site.logits(h), dtype)
        if getattr(site.block, "zero_expert_num", 0):
            # LongCat's identity ("zero") experts: since transformers 5.25 its block hands the experts dummy ids
            # with weight 0 for them, so the reference for the gating is the router's own selection
            assert unfaithful((stock[2], stock[1]), (experts, weights)) is None
        elif len(seen[0]) == 3:  # fused experts: (h, top_k_index, top_k_weights)
            assert unfaithful((seen[0][1], seen[0][2]), (experts, weights)) is None
        else:  # Llama 4's experts get the tokens pre-scaled; its router's own scores carry the selection
            scores = stock[0]
            assert unfaithful((scores.topk(site.top_k).indices, scores.topk(site.top_k).values),
                              (experts, weights)) is None
            assert torch.equal((scores != 0).sum(-1), torch.full((scores.shape[0],), site.top_k))


def test_faithful_means_the_same_experts_and_weights_within_a_few_ulps():
    """`unfaithful` against hand-made outputs: one ulp and another expert order pass; 2x the tolerance, another
    expert or another dtype do not."""
    experts = torch.tensor([[0, 3], [2, 1]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    ulp = torch.finfo(torch.float32).eps
    assert unfaithful((weights, experts), (weights * (1 + ulp), experts)) is None
    assert unfaithful((weights, experts), (weights.flip(-1), experts.flip(-1))) is None  # same pairs, other order
    assert "largest difference" in unfaithful((weights, experts), (weights * (1 + 2 * ULPS * ulp), experts))
    assert "another expert set for 1 tokens" in unfaithful((weights, experts), (weights, torch.tensor([[0, 3], [2, 0]])))
    assert "restated" in unfaithful((weights, experts), (weights.double(), experts))
    assert "2 tensors" in unfaithful((weights, experts), (weights,))


@pytest.mark.equivalence
def test_a_far_memory_is_stock_even_where_the_restatement_is_wrong(monkeypatch, tmp_path):
    """Stock by construction: with every restated router output doubled, a far memory still reproduces the model
    bit for bit, because no row goes through the restatement."""
    model = make_tiny_model("llama4")
    ids = torch.randint(4, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    sig = model_signature(model, find_routers(model))
    far = {l: torch.full((3, sig["hidden_size"]), 500.0) for l in sig["moe_layers"]}
    mem = write_memory(tmp_path / "m", far, {l: torch.randn(3, sig["num_experts"]) for l in far}, sig)
    restated = RouterSite.output
    with torch.no_grad(), attach(model, mem, sigma=1.0):  # the load-time check would refuse the doubled outputs
        monkeypatch.setattr(RouterSite, "output", lambda self, *a, **kw: tuple(2 * t for t in restated(self, *a, **kw)))
        assert torch.equal(model(ids).logits, ref)


def test_a_build_writes_a_valid_memory_whose_self_retrieval_moves_the_routing_of_stored_tokens_only(
    family, tmp_path
):
    model = make_tiny_model(family)
    sites = find_routers(model)
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(4):
        ids = torch.randint(4, 250, (12,), generator=gen).tolist()
        seqs.append(tokenize_request(("t", i, 0), [1] + ids[:-4], ids[-4:], max_length=64))
    # Phi-3.5-MoE's sparsemixer weighs an expert 1.0 unless another is within 2% of it: the paper's gradient
    # vanishes almost everywhere there (docs/families.md), so it is built with the dense one
    grad = "dense" if family == "phimoe" else "paper"
    builder = MemoryBuilder(model, sites, model_signature(model, sites),  # random experts barely move the loss:
                            KnnMoeOptions(memory=str(tmp_path / "m"), eta=1e6, grad=grad))  # a huge step
    builder.run(seqs, pad_id=0, batch_size=4)
    builder.finalize()
    mem = load_memory(tmp_path / "m")  # checksums verified
    assert all(len(mem.layers[s.layer]) == 4 * 4 for s in sites)
    with torch.no_grad(), attach(model, mem, sigma=0.1) as retriever:
        model(torch.tensor([seqs[0].tokens]))
    first = retriever.diagnostics()[str(sites[0].layer)]  # its router inputs are exactly those stored
    stored = 4 / len(seqs[0].tokens)  # the answer positions' share of the query's tokens
    assert first["mean_lambda"] == pytest.approx(stored, abs=0.01)
    assert 0 < first["topk_changed"] <= stored


def test_a_router_that_changed_is_refused_at_load(monkeypatch):
    model = make_tiny_model("deepseek_v3")
    router_class = type(find_routers(model)[0].module)
    stock_forward = router_class.forward

    def drifted(self, hidden_states):  # a release that, say, dropped the 1e-20 and rescaled
        logits, weights, experts = stock_forward(self, hidden_states)
        return logits, weights * 1.001, experts

    monkeypatch.setattr(router_class, "forward", drifted)
    with pytest.raises(KnnMoeError, match="deepseek_v3 router") as e:
        find_routers(model)
    assert f"transformers {transformers.__version__}" in str(e.value) and "largest difference" in str(e.value)


@pytest.mark.parametrize("family, overrides, layers", [
    ("qwen2_moe", dict(num_hidden_layers=4, mlp_only_layers=[0, 2]), [1, 3]),
    ("deepseek_v3", dict(num_hidden_layers=3, first_k_dense_replace=1), [1, 2]),
    ("lfm2_moe", {}, [1, 2]),
])
def test_mixed_dense_and_moe_layers_are_keyed_by_layer_index(family, overrides, layers):
    assert [s.layer for s in find_routers(make_tiny_model(family, **overrides))] == layers


def test_dense_model_is_refused_with_the_supported_list():
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(KnnMoeError, match="does not support model_type 'llama'") as e:
        find_routers(model)
    assert all(name in str(e.value) for name in supported())
