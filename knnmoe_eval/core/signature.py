"""What a memory records about the model it was built for, and what loading checks a model against.

Each router is recorded twice: `router_fingerprints`, a sha256 of its weights rounded to bf16 (equal for a bf16
checkpoint loaded in bf16, fp16 or fp32, and for fp32 weights loaded in bf16 or fp32), and `router_projections`,
PROJECTIONS random bilinear forms s_e^T W s_d (+ s_e^T b) of the weights in float64. Rounding the same weights to
another dtype moves the forms by about the dtype's relative precision (bf16: 2^-9 per weight, ~1e-3 of |p| for
the whole vector), another model's router by about |p| itself, so `same_weights` tells "the same model in another
dtype" (an fp32-built memory evaluated in fp16, where double rounding through fp16 changes some bf16 roundings,
or a bf16 checkpoint in fp16, where the smallest weights underflow) from "another model", which the sha alone
cannot.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

from .routers import RouterSite

PROJECTIONS = 16
# relative distance of the projection vectors below which two routers are the same weights at two precisions:
# bf16 rounding gives ~1.1e-3 (the rms of a uniform relative error of at most 2^-9); fp16's is 4x smaller
SAME_WEIGHTS_RTOL = 4e-3


def router_fingerprint(site: RouterSite) -> str:
    """sha256 of the router weights rounded to bf16: equal for a bf16 checkpoint loaded in bf16, fp16 or fp32."""
    h = hashlib.sha256()
    for p in (site.weight, site.bias):
        if p is not None:
            h.update(p.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


def router_projections(site: RouterSite) -> list[float]:
    """PROJECTIONS seeded random bilinear forms of the router's weights (and bias), in float64."""
    w = site.weight.detach().to("cpu", torch.float64)  # (E, d)
    g = torch.Generator().manual_seed(0)
    s_e = torch.randint(0, 2, (PROJECTIONS, w.shape[0]), generator=g).to(torch.float64) * 2 - 1
    s_d = torch.randint(0, 2, (PROJECTIONS, w.shape[1]), generator=g).to(torch.float64) * 2 - 1
    p = ((s_e @ w) * s_d).sum(-1)
    if site.bias is not None:
        p = p + s_e @ site.bias.detach().to("cpu", torch.float64)
    return p.tolist()


def same_weights(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two routers' projections are those of the same weights up to rounding (see the module docstring)."""
    if len(a) != len(b) or not a:
        return False
    diff = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
    return diff <= SAME_WEIGHTS_RTOL * max(math.sqrt(sum(x * x for x in a)), 1e-30)


def model_signature(model: torch.nn.Module, sites: Sequence[RouterSite]) -> dict:
    """What a memory records about its model, and what loading checks it against."""
    cfg = model.config
    commit = getattr(cfg, "_commit_hash", None)  # the Hub commit from_pretrained read, for people (the card)
    return {
        "name_or_path": cfg.name_or_path,
        **({"revision": commit} if isinstance(commit, str) else {}),
        "model_type": sites[0].family.name,
        "hidden_size": sites[0].hidden_size,
        "num_experts": sites[0].num_experts,
        "top_k": sites[0].top_k,
        "moe_layers": [s.layer for s in sites],
        "router_dtype": str(sites[0].weight.dtype).removeprefix("torch."),
        "router_fingerprints": {str(s.layer): router_fingerprint(s) for s in sites},
        "router_projections": {str(s.layer): router_projections(s) for s in sites},
    }
