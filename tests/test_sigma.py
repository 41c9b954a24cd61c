"""σ's two readings of the paper's "average nearest neighbor distance": auto (2σ² = mean squared NN distance) and
mean_nn (σ = mean NN distance), each against an independent float64 computation."""

import numpy as np
import pytest
import torch

from knnmoe_eval import KnnMoeError, load_memory
from knnmoe_eval.core.options import KnnMoeOptions, split_model_args
from knnmoe_eval.core.retrieval import Retriever
from knnmoe_eval.core.sigma import layer_stats, two_sigma2
from knnmoe_eval.testing import make_tiny_model, write_constant_memory


def brute_nn_dist(keys: np.ndarray) -> np.ndarray:
    """Each key's distance to its nearest other key, float64, every pair by explicit differences."""
    d2 = ((keys[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    return np.sqrt(d2.min(1))


def test_mean_nn_sigma_is_the_mean_nearest_neighbour_distance(tmp_path):
    # 300 keys: below the statistics' 2,048-query sample, so every key is a query and the figure is exact.
    # float32 distances by |q|² + |x|² - 2 q·x: terms ~2·16, a nearest squared distance ~10, float32 rounding
    # ~32 · 6e-8 · a few, i.e. ~1e-6 relative; 1e-5 leaves room and still fails any other formula
    keys = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)).half()
    k64 = keys.double().numpy()
    nn, nn_l2 = brute_nn_dist(k64), brute_nn_dist(k64 / np.linalg.norm(k64, axis=1, keepdims=True))
    stats = layer_stats(keys)
    assert stats["mean_nn_dist"] == pytest.approx(nn.mean(), rel=1e-5)
    assert stats["mean_nn_dist_l2"] == pytest.approx(nn_l2.mean(), rel=1e-5)
    assert two_sigma2("rbf", "mean_nn", stats, 0, tmp_path) == pytest.approx(2 * nn.mean() ** 2, rel=2e-5)
    assert two_sigma2("rbf_l2", "mean_nn", stats, 0, tmp_path) == pytest.approx(2 * nn_l2.mean() ** 2, rel=2e-5)
    assert two_sigma2("rbf", None, stats, 0, tmp_path) == pytest.approx((nn**2).mean(), rel=1e-5)  # auto
    assert two_sigma2("rbf", 0.5, stats, 0, tmp_path) == 0.5  # an explicit sigma: 2 · 0.5²
    # a memory written before the statistic existed is refused with the fix, never given auto's bandwidth
    old = {k: v for k, v in stats.items() if not k.startswith("mean_nn_dist")}
    with pytest.raises(KnnMoeError, match="sigma=mean_nn needs .* rebuild the memory"):
        two_sigma2("rbf", "mean_nn", old, 0, tmp_path)


def test_mean_nn_reaches_the_retriever_from_a_model_arg(tmp_path):
    model = make_tiny_model("olmoe")
    d, layers = model.config.hidden_size, range(model.config.num_hidden_layers)
    keys = {l: torch.randn(50, d, generator=torch.Generator().manual_seed(l)) for l in layers}
    memory = load_memory(write_constant_memory(tmp_path / "m", model, keys, lambda l, n, e: torch.zeros(n, e)))
    opts, _ = split_model_args({"memory": str(memory.path), "sigma": "mean_nn"}, set())
    retriever = Retriever(model, memory, opts)
    for layer, lr in retriever.layers.items():
        nn = brute_nn_dist(keys[layer].half().double().numpy())
        assert lr.two_sigma2 == pytest.approx(2 * nn.mean() ** 2, rel=2e-5)
    with pytest.raises(KnnMoeError, match="sigma='mean': choose auto, mean_nn or a positive number"):
        KnnMoeOptions(memory=str(memory.path), sigma="mean")
