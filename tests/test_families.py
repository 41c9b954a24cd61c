import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from knnmoe_eval import KnnMoeError
from knnmoe_eval.core.families import FAMILIES, find_routers
from knnmoe_eval.testing import make_tiny_model


def test_gating_matches_stock_router_bit_for_bit(family):
    model = make_tiny_model(family)
    torch.manual_seed(1)
    for site in find_routers(model):
        h = torch.randn(37, site.hidden_size) * 3
        logits, scores, indices = site.module(h)
        ours_scores, ours_indices = site.gate(site.logits(h))
        assert torch.equal(site.logits(h), logits)
        assert torch.equal(ours_indices, indices)
        assert torch.equal(ours_scores, scores) and ours_scores.dtype == scores.dtype


def test_gating_bit_exact_in_bf16(family):
    model = make_tiny_model(family).to(torch.bfloat16)
    site = find_routers(model)[0]
    h = torch.randn(16, site.hidden_size, dtype=torch.bfloat16)
    _, scores, indices = site.module(h)
    ours_scores, ours_indices = site.gate(site.logits(h))
    assert torch.equal(ours_indices, indices) and torch.equal(ours_scores, scores)


def test_mixed_dense_and_moe_layers_are_keyed_by_layer_index():
    model = make_tiny_model("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[0, 2])
    assert [s.layer for s in find_routers(model)] == [1, 3]


def test_dense_model_is_refused_with_the_supported_list():
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(KnnMoeError, match="does not support model_type 'llama'") as e:
        find_routers(model)
    assert all(name in str(e.value) for name in FAMILIES)
