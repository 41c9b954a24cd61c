"""Pruning drops entries that do not change routing and near-duplicate keys, and writes a valid memory."""

import pytest
import torch

from knnmoe_eval.core.memory import load_memory, write_memory
from knnmoe_eval.core.prune import prune_memory
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.errors import KnnMoeError
from knnmoe_eval.memory_cli import main
from knnmoe_eval.testing import make_tiny_model, router_inputs, signature

IDS = torch.randint(4, 250, (2, 10), generator=torch.Generator().manual_seed(0))


def memory_half_stock(tmp_path, model):
    """Per layer: 20 keys; the first 10 values are the stock logits, the last 10 send every key to other experts."""
    keys = router_inputs(model, IDS)
    values = {}
    for site in find_routers(model):
        with torch.no_grad():
            stock = site.logits(keys[site.layer].half().float())  # the memory stores fp16 keys
        other = -stock
        values[site.layer] = torch.cat([stock[:10], other[10:]])
    return write_memory(tmp_path / "m", keys, values, signature(model))


def test_entries_that_do_not_change_routing_are_dropped(tmp_path, family):
    model = make_tiny_model(family)
    out, counts = prune_memory(memory_half_stock(tmp_path, model), tmp_path / "p", model, min_change=1e-5)
    pruned = load_memory(out)
    for layer, mem in pruned.layers.items():
        assert counts[str(layer)] == (20, 10) and len(mem) == 10
    assert pruned.manifest["build"]["pruning"]["min_change"] == 1e-5


def test_near_duplicate_keys_are_dropped(tmp_path):
    model = make_tiny_model("olmoe")
    keys = router_inputs(model, IDS)
    dup = {l: torch.cat([k, k[:5] + 1e-4]) for l, k in keys.items()}
    values = {l: torch.randn(k.shape[0], signature(model)["num_experts"]) for l, k in dup.items()}
    mem = write_memory(tmp_path / "m", dup, values, signature(model))
    out, counts = prune_memory(mem, tmp_path / "p", model, dedup=0.01)
    assert all(c == (25, 20) for c in counts.values())
    kept = load_memory(out)
    for layer, m in kept.layers.items():
        assert torch.equal(m.keys, keys[layer].half())  # the first of each pair is kept, in order


def test_prune_needs_a_criterion_and_the_cli_writes_a_memory(tmp_path, olmoe_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(olmoe_dir)
    mem = memory_half_stock(tmp_path, model)
    with pytest.raises(KnnMoeError, match="min_change"):
        prune_memory(mem, tmp_path / "p", model)
    argv = ["prune", str(mem), "--pretrained", olmoe_dir, "--out", str(tmp_path / "cli"), "--min-change", "1e-5"]
    assert main(argv) == 0
    assert all(len(m) == 10 for m in load_memory(tmp_path / "cli").layers.values())
