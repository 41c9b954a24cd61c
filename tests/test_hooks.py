"""hooks.hooked_routers: its two refusals (a nested hook, a router that never ran) and what each leaves behind."""

import pytest
import torch

from knnmoe_eval import KnnMoeError
from knnmoe_eval.core.hooks import hooked_routers
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.testing import make_tiny_model

IDS = torch.randint(4, 250, (1, 8), generator=torch.Generator().manual_seed(0))


def counting(counts):
    def transform(site, h, z):
        counts[site.layer] = counts.get(site.layer, 0) + 1
        return z

    return transform


def test_a_refused_nested_hook_leaves_the_outer_hooks_in_place(family):
    model = make_tiny_model(family)
    sites = find_routers(model)
    outer, inner = {}, {}
    with torch.no_grad():
        ref = model(IDS).logits
        with hooked_routers(sites, counting(outer)):
            # refused at the first site: the inner context installed nothing, so it must remove nothing
            with pytest.raises(KnnMoeError, match="already hooked: kNN-MoE hooks cannot be nested"):
                with hooked_routers(sites, counting(inner)):
                    pass
            out = model(IDS).logits  # the outer hooks still run, and its exit check passes
        assert inner == {} and outer == {s.layer: 1 for s in sites}
        assert torch.equal(out, ref)
        assert all("forward" not in vars(s.module) for s in sites)  # the outer exit restored every router
        assert torch.equal(model(IDS).logits, ref)


def test_a_partly_hooked_refusal_removes_only_what_it_installed(family):
    """The nested context hooks the sites before the already-hooked one, then is refused: it takes back exactly
    those, and the outer context's hook on the later site survives."""
    model = make_tiny_model(family)
    sites = find_routers(model)
    assert len(sites) >= 2
    outer = {}
    with torch.no_grad(), hooked_routers(sites[-1:], counting(outer)):
        with pytest.raises(KnnMoeError, match=f"router {sites[-1].name} is already hooked"):
            with hooked_routers(sites, counting({})):
                pass
        assert all("forward" not in vars(s.module) for s in sites[:-1])
        assert "forward" in vars(sites[-1].module)
        model(IDS)
    assert outer == {sites[-1].layer: 1}
    assert all("forward" not in vars(s.module) for s in sites)


def test_a_bypassed_router_is_reported_and_restored(family):
    """A hub kernel that replaces the MoE block's forward never calls the router: the exit check names it."""
    model = make_tiny_model(family)
    sites = find_routers(model)
    bypassed = sites[0]
    moe_block = bypassed.block
    stock = {}  # the block's own output on these inputs, whatever its structure (some blocks also return scores)
    handle = moe_block.register_forward_hook(lambda module, args, out: stock.setdefault("out", out))
    with torch.no_grad():
        model(IDS)
    handle.remove()

    def kernel(hidden_states, *args, **kwargs):  # what such a kernel amounts to: the output, the router never called
        return stock["out"]

    moe_block.forward = kernel
    with pytest.raises(KnnMoeError, match=rf"never ran for \['{bypassed.name}'\].*use_kernels=False"):
        with torch.no_grad(), hooked_routers(sites, counting({})):
            model(IDS)
    assert all("forward" not in vars(s.module) for s in sites)


def test_an_error_inside_the_block_propagates_unchanged_and_restores_the_routers():
    model = make_tiny_model("olmoe")
    sites = find_routers(model)
    with pytest.raises(RuntimeError, match="boom"):
        with hooked_routers(sites, counting({})):
            raise RuntimeError("boom")  # not masked by the never-ran check
    assert all("forward" not in vars(s.module) for s in sites)
