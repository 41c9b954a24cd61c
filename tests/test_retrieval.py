"""attach(): an empty or far memory reproduces the stock model bit for bit; a near one moves the experts."""

import pytest
import torch
from conftest import empty_keys, router_inputs, signature, write_constant_memory

from knnmoe_eval import attach
from knnmoe_eval.core.families import find_routers
from knnmoe_eval.core.hooks import hooked_routers
from knnmoe_eval.testing import make_tiny_model

IDS = torch.randint(4, 250, (2, 10), generator=torch.Generator().manual_seed(0))


def record_layer(record, layer):
    def hook(module, args, out):
        record(module, args, out, layer)

    return hook


@pytest.mark.parametrize("memory_kind", ["empty", "far"])
def test_memory_with_nothing_near_reproduces_the_stock_model(tmp_path, family, memory_kind):
    model = make_tiny_model(family)
    if memory_kind == "empty":
        keys = empty_keys(model)
    else:
        keys = {l: torch.full((4, h.shape[1]), 500.0) + torch.arange(4.0)[:, None]
                for l, h in router_inputs(model, IDS).items()}
    mem = write_constant_memory(tmp_path / "m", model, keys, lambda l, n, e: torch.randn(n, e) * 100)
    with torch.no_grad():
        ref = model(IDS).logits
        ref_gen = model.generate(IDS, max_new_tokens=5, do_sample=False)
        with attach(model, mem, sigma=1.0) as retriever:
            out = model(IDS).logits
            gen = model.generate(IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert all(d["mean_lambda"] == 0.0 and d["topk_changed"] == 0.0 and d["top1_share"] is None
               for d in retriever.diagnostics().values())


def test_values_naming_other_experts_change_topk_where_lambda_is_high_only(tmp_path, family):
    model = make_tiny_model(family)
    sites = find_routers(model)
    near = router_inputs(model, IDS[:1])  # memory = the first sequence's own router inputs
    E = signature(model)["num_experts"]

    def values(layer, n, e):
        v = torch.full((n, e), -20.0)
        v[:, -2:] = 20.0  # always the last two experts
        return v

    mem = write_constant_memory(tmp_path / "m", model, near, values)

    def passthrough(site, h, z):
        return z

    def topk_sets(ids, ctx):
        """Sorted top-k expert ids per layer, as the MoE blocks received them."""
        sets = {}

        def record(module, args, out, layer):
            sets[layer] = out[2].sort(-1).values

        handles = [s.module.register_forward_hook(record_layer(record, s.layer)) for s in sites]
        try:
            with torch.no_grad(), ctx as r:
                model(ids)
        finally:
            for h in handles:
                h.remove()
        return sets, r

    far_ids = IDS[1:] * 0 + 200  # a sequence unlike the stored one
    stock_near, _ = topk_sets(IDS[:1], hooked_routers(sites, passthrough))
    mixed_near, r = topk_sets(IDS[:1], attach(model, mem, sigma=0.05))
    first = sites[0].layer
    assert r.diagnostics()[str(first)]["mean_lambda"] == pytest.approx(1.0, abs=1e-3)
    assert torch.all(mixed_near[first] == torch.tensor([E - 2, E - 1]))
    assert not torch.equal(stock_near[first], mixed_near[first])
    stock_far, _ = topk_sets(far_ids, hooked_routers(sites, passthrough))
    mixed_far, r = topk_sets(far_ids, attach(model, mem, sigma=0.05, max_distance=0.5))
    assert r.diagnostics()[str(first)]["mean_lambda"] == 0.0
    assert all(torch.equal(stock_far[l], mixed_far[l]) for l in stock_far)


def test_top1_share_is_one_with_a_single_neighbour(tmp_path):
    model = make_tiny_model("olmoe")
    mem = write_constant_memory(tmp_path / "m", model, router_inputs(model, IDS), lambda l, n, e: torch.zeros(n, e))
    with torch.no_grad(), attach(model, mem, k=1, sigma=1.0) as retriever:
        model(IDS)
    assert all(d["top1_share"] == 1.0 for d in retriever.diagnostics().values())


def test_top1_share_of_two_hand_placed_keys(tmp_path):
    """One token, two keys at distances 1 and 2 from its router input: share = e^-1/2 / (e^-1/2 + e^-2) (sigma 1)."""
    model = make_tiny_model("olmoe")
    ids = IDS[:1, :1]
    h = router_inputs(model, ids)  # (1, d) per layer
    step = torch.zeros_like(h[0])
    step[0, 0] = 1.0
    keys = {l: torch.cat([x + step, x + 2 * step]) for l, x in h.items()}
    mem = write_constant_memory(tmp_path / "m", model, keys, lambda l, n, e: torch.zeros(n, e))
    first = find_routers(model)[0].layer
    with torch.no_grad(), attach(model, mem, k=2, sigma=1.0) as retriever:
        model(ids)
    d2 = ((keys[first].half().float() - h[first]) ** 2).sum(-1)  # true distances to the stored fp16 keys
    s = torch.exp(-d2 / 2.0)
    diag = retriever.diagnostics()
    assert diag[str(first)]["top1_share"] == pytest.approx((s.max() / s.sum()).item(), rel=1e-5)
    assert diag[str(first)]["top1_share"] == pytest.approx(0.8176, abs=1e-3)  # e^-.5 / (e^-.5 + e^-2)
    assert all(0.5 <= d["top1_share"] <= 1.0 for d in diag.values())
