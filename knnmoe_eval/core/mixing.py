"""The kNN-MoE inference rule, as pure torch: neighbours -> similarities -> proposal -> confidence -> mixed logits.

For one MoE layer and n tokens with router logits z and the k retrieved memory entries (distance, value z*):

    s_i    = exp(-||h - key_i||^2 / (2 sigma^2))            (rbf; or on L2-normalised vectors; or cosine)
    z_mem  = sum_i s_i z*_i / sum_i s_i                      similarity-weighted proposal
    lambda = mean_i s_i                                      confidence: ~1 on a stored key, -> 0 far away
    z'     = (1 - lambda) z + lambda z_mem                   then the model's own top-k gating runs on z'

`confidence=radius` (beyond the paper) replaces the kernel by a calibrated cut-off: s_i = 1 if ||h - key_i|| <= r_l,
else 0, with r_l the layer's radius from the memory's own leave-one-out distances (`sigma.layer_stats`): a query
as close to the memory as its keys are to each other takes the stored routing whole, anything farther is stock.

Under `confidence=radius` the layers must also agree (`agree_with_earlier`): a token is within reach at layer l only
if it was within its radius at every earlier layer of the forward. The first MoE layer's router input does not
depend on any routing, and its keys are the same whether the memory read them under stock or mixed routing, so it
is the one comparison that never drifts; a later layer's keys (read under the stored routing, `keys=mixed`) sit
where the source domain's own tokens are, and a radius set by their spread admits those tokens there. Requiring
every earlier layer to agree can only take tokens away from the memory, never add one. The agreement is kept
by the Retriever from one layer call to the next of a forward (layers run in order, eagerly), so under
pipeline parallelism each stage starts it afresh at its own first layer.

Tokens with lambda == 0 get z back unchanged (not recomputed), which is what makes an empty or far-away memory
reproduce the stock model bit for bit. Independent of models, families and lm-eval; `attach` calls it.
"""

from __future__ import annotations

import torch

SIMILARITIES = ("rbf", "rbf_l2", "cosine")


def similarity(dist2: torch.Tensor, kind: str, two_sigma2: float, max_distance: float | None = None) -> torch.Tensor:
    """Similarities (n, k) from squared L2 distances (n, k).

    For `rbf_l2` and `cosine` the distances must be between L2-normalised vectors, where ||a - b||^2 = 2 - 2 cos.
    `max_distance` (in the same space as the distances) sets s = 0 beyond it: the exp kernel alone never reaches 0.
    """
    if kind in ("rbf", "rbf_l2"):
        s = torch.exp(-dist2 / two_sigma2)
    elif kind == "cosine":
        s = (1.0 - dist2 / 2.0).clamp(min=0.0)  # anti-similar neighbours carry no confidence
    else:
        raise ValueError(f"unknown similarity {kind!r}; choose one of {', '.join(SIMILARITIES)}")
    if max_distance is not None:
        s = torch.where(dist2 > max_distance**2, torch.zeros_like(s), s)
    return s


def within_radius(dist2: torch.Tensor, radius: float) -> torch.Tensor:
    """Similarities (n, k) of `confidence=radius`: 1 for neighbours within `radius` (same space as dist2), else 0."""
    return (dist2 <= radius**2).to(dist2.dtype)


def agree_with_earlier(sims: torch.Tensor, near_before: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`confidence=radius` across layers: the similarities (n, k) of one layer with every neighbour of a token zeroed
    where that token was beyond the radius at an earlier layer, and the tokens (n,) bool within reach so far.

    near_before: (n,) bool from the previous layer of the same forward, None at its first layer."""
    near = (sims > 0).any(dim=-1)
    if near_before is not None:
        near = near & near_before.to(near.device)
        sims = torch.where(near.unsqueeze(-1), sims, torch.zeros_like(sims))
    return sims, near


def mix(z: torch.Tensor, values: torch.Tensor, sims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed logits and confidence.

    z:      (n, E)    the router's own logits
    values: (n, k, E) the retrieved z* of each token's k neighbours
    sims:   (n, k)    their similarities, in [0, 1]
    returns z' (n, E) in z's dtype, lambda (n,) fp32
    """
    sims = sims.float()
    lam = sims.mean(dim=-1)  # (n,)
    total = sims.sum(dim=-1, keepdim=True)  # (n, 1)
    z_mem = (sims.unsqueeze(-1) * values.float()).sum(dim=1) / total.clamp_min(torch.finfo(torch.float32).tiny)
    mixed = (1.0 - lam).unsqueeze(-1) * z.float() + lam.unsqueeze(-1) * z_mem  # (n, E)
    return torch.where((lam > 0).unsqueeze(-1), mixed.to(z.dtype), z), lam
