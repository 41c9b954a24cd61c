import math

import torch

from knnmoe_eval.core.mixing import mix, similarity


def test_two_key_memory_matches_the_formula_by_hand():
    z = torch.tensor([[1.0, 0.0, -1.0]])
    values = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])  # (1, k=2, E=3)
    dist2 = torch.tensor([[0.5, 2.0]])
    two_sigma2 = 1.0
    s1, s2 = math.exp(-0.5), math.exp(-2.0)
    lam = (s1 + s2) / 2
    z_mem = [(s1 * 4.0) / (s1 + s2), (s2 * 2.0) / (s1 + s2), 0.0]
    expected = torch.tensor([[(1 - lam) * 1.0 + lam * z_mem[0], lam * z_mem[1], (1 - lam) * -1.0]])
    sims = similarity(dist2, "rbf", two_sigma2)
    out, got_lam = mix(z, values, sims)
    torch.testing.assert_close(got_lam, torch.tensor([lam]))
    torch.testing.assert_close(out, expected)


def test_zero_confidence_returns_the_logits_unchanged_bit_for_bit():
    z = torch.randn(5, 8, dtype=torch.bfloat16)
    values = torch.full((5, 1, 8), float(1e30))
    out, lam = mix(z, values, torch.zeros(5, 1))
    assert torch.equal(out, z) and out.dtype == z.dtype and torch.all(lam == 0)


def test_max_distance_cuts_far_neighbours_to_zero():
    dist2 = torch.tensor([[0.25, 4.0]])
    s = similarity(dist2, "rbf", 1.0, max_distance=1.0)
    assert s[0, 0] == math.exp(-0.25) and s[0, 1] == 0


def test_cosine_is_one_on_the_same_direction_and_zero_when_opposite():
    # distances between unit vectors: 0 (same), 2 (orthogonal: |a-b|^2 = 2), 4 (opposite)
    s = similarity(torch.tensor([[0.0, 2.0, 4.0]]), "cosine", 1.0)
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0, 0.0]]))
