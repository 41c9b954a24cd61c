"""Small memories under every index: GPQA's reference set gives ~250 keys per layer, fewer than d/8 PCA dimensions
at OLMoE's and gpt-oss's widths (256, 360); the plan bounds PCA and IVF by what the keys can train."""

import pytest
import torch

from knnmoe_eval.core import index as knn_index


@pytest.mark.parametrize("name", ["ivfpq", "ivfpq_rerank", "hnsw"])
@pytest.mark.parametrize(("d", "n"), [(2048, 250), (2880, 250), (2048, 30)])
def test_small_memories_train_every_index_and_find_their_own_keys(name, d, n):
    plan = knn_index.plan(name, d, n)
    pca = int(plan.factory.split(",")[0].removeprefix("PCA"))
    assert pca == min(d // 8, n)
    keys = torch.randn(n, d, generator=torch.Generator().manual_seed(n)).to(torch.float16)
    idx = knn_index.build_index(keys, plan.factory, plan.nprobe)
    _, ids = idx.search(keys[:8].float().numpy(), 1)
    assert ids[:, 0].tolist() == list(range(8))  # each key is its own nearest neighbour


def test_large_memories_keep_the_papers_d_over_8():
    assert knn_index.plan("ivfpq", 2880, 10_000).factory.startswith("PCA360,")
    assert knn_index.plan("hnsw", 2048, 257).factory == "PCA256,HNSW32"
