"""What a memory records about the model it was built for, and what loading checks a model against."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from .routers import RouterSite


def router_fingerprint(site: RouterSite) -> str:
    """sha256 of the router weights rounded to bf16: equal for a bf16 checkpoint loaded in bf16, fp16 or fp32."""
    h = hashlib.sha256()
    for p in (site.weight, site.bias):
        if p is not None:
            h.update(p.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


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
        "router_fingerprints": {str(s.layer): router_fingerprint(s) for s in sites},
    }
