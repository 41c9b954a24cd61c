"""attach(): an empty or far memory reproduces the stock model bit for bit; a near one moves the experts."""

from dataclasses import replace

import pytest
import torch

from knnmoe_eval import KnnMoeOptions, attach
from knnmoe_eval.core.hooks import hooked_routers, routed_logits
from knnmoe_eval.core.memory import load_memory
from knnmoe_eval.core.retrieval import Retriever
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.testing import empty_keys, make_tiny_model, router_inputs, signature, write_constant_memory

IDS = torch.randint(4, 250, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.equivalence
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_kind", ["empty", "far"])
def test_memory_with_nothing_near_reproduces_the_stock_model(tmp_path, family, memory_kind, dtype):
    model = make_tiny_model(family).to(dtype)
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
    E, k = signature(model)["num_experts"], sites[0].top_k

    def values(layer, n, e):
        v = torch.full((n, e), -20.0)
        v[:, -k:] = 20.0  # always the last k experts
        return v

    mem = load_memory(write_constant_memory(tmp_path / "m", model, near, values))

    def topk_sets(ids, transform):
        """Sorted top-k expert ids per layer, as the family's gating made them from the hooked logits."""
        sets = {}

        def recording(site, h, z):
            out = transform(site, h, z)
            sets[site.layer] = site.gate(routed_logits(out), h.dtype)[1].sort(-1).values
            return out

        with torch.no_grad(), hooked_routers(sites, recording):
            model(ids)
        return sets

    def retriever(**options):
        return Retriever(model, mem, replace(KnnMoeOptions(memory=str(mem.path)), **options), sites=sites)

    def passthrough(site, h, z):
        return z

    far_ids = IDS[1:] * 0 + 200  # a sequence unlike the stored one
    stock_near = topk_sets(IDS[:1], passthrough)
    mixed_near = topk_sets(IDS[:1], r := retriever(sigma=0.05))
    first = sites[0].layer
    assert r.diagnostics()[str(first)]["mean_lambda"] == pytest.approx(1.0, abs=1e-3)
    assert torch.all(mixed_near[first] == torch.arange(E - k, E))
    assert not torch.equal(stock_near[first], mixed_near[first])
    stock_far = topk_sets(far_ids, passthrough)
    mixed_far = topk_sets(far_ids, r := retriever(sigma=0.05, max_distance=0.5))
    assert r.diagnostics()[str(first)]["mean_lambda"] == 0.0
    assert all(torch.equal(stock_far[l], mixed_far[l]) for l in stock_far)


def test_top1_share_counts_the_confident_tokens_alone(tmp_path):
    """k = 1: the share is 1 over the tokens whose neighbour was mixed in, however many others were far (lambda = 0),
    and None when no token was near."""
    model = make_tiny_model("olmoe")
    first_row = {l: h[: IDS.shape[1]] for l, h in router_inputs(model, IDS).items()}
    mem = write_constant_memory(tmp_path / "m", model, first_row, lambda l, n, e: torch.zeros(n, e))
    for ids, share in ((IDS, 1.0), (IDS[1:], None)):
        with torch.no_grad(), attach(model, mem, k=1, sigma=1.0, max_distance=0.5) as retriever:
            model(ids)
        diag = retriever.diagnostics().values()
        assert all(d["top1_share"] == share for d in diag)
        assert all((0 < d["mean_lambda"] <= 0.5) if share else d["mean_lambda"] == 0 for d in diag)


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
