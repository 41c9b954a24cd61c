"""The load-balancing loss the hooks measure is the family's own aux loss, bit for bit up to summation order."""

import pytest
import torch

from knnmoe_eval import KnnMoeOptions, Retriever, load_memory
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.experiments.balance import load_balance
from knnmoe_eval.testing import make_tiny_model, router_inputs, write_constant_memory

SEQS = [torch.randint(4, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 11)]


def test_stock_routing_gives_the_models_own_aux_loss(family):
    model = make_tiny_model(family)
    ours = load_balance(model, find_routers(model), SEQS)
    with torch.no_grad():
        aux = [model(torch.tensor([s]), output_router_logits=True).aux_loss for s in SEQS]
    if aux[0] is None:
        pytest.skip(f"transformers computes no load-balancing loss for {family}: no formula of its own to match")
    theirs = [float(a) for a in aux]
    assert ours == pytest.approx(theirs, rel=1e-6)  # float32 sums in another order
    assert all(0 < x <= model.config.num_experts_per_tok * 8 for x in ours)


def test_retrieval_is_measured_after_mixing(tmp_path):
    """A memory that sends every token to experts 0 and 1 makes the routing maximally unbalanced: E * P_0-ish."""
    model = make_tiny_model("olmoe")
    ids = torch.tensor([SEQS[1]])
    keys = router_inputs(model, ids)
    values = lambda l, n, e: torch.tensor([50.0, 50.0] + [0.0] * (e - 2)).expand(n, e)  # noqa: E731
    mem = write_constant_memory(tmp_path / "m", model, keys, values)
    stock = load_balance(model, find_routers(model), [SEQS[1]])[0]
    retriever = Retriever(model, load_memory(mem), KnnMoeOptions(memory=str(mem), sigma=1.0))
    mixed = load_balance(model, find_routers(model), [SEQS[1]], inner=retriever)[0]
    # every token's own key is in the memory (lambda = 1): all top-2 slots on experts 0, 1 with probability ~1/2
    assert mixed == pytest.approx(8 * 2 * 0.5, rel=1e-3) and stock < mixed
