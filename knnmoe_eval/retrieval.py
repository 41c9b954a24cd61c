"""Retrieval at inference: one faiss index per MoE layer, queried once per layer per forward for all tokens.

`Retriever` is the hook transform for evaluation (see `hooks.py`): router input h -> k nearest keys -> `mixing`.
It is built once per model and memory (the memory is validated against the model there, before any forward),
and keeps per-layer diagnostics: mean lambda and the fraction of tokens whose top-k expert set changed.
`attach(model, memory)` is the public entry point for any HF MoE model outside lm-eval.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from . import index as knn_index
from .errors import KnnMoeError
from .families import RouterSite, find_routers
from .hooks import hooked_routers
from .memory import Memory, l2_normalize, load_memory, model_signature
from .mixing import mix, similarity
from .options import KnnMoeOptions

log = logging.getLogger(__name__)


class _LayerRetrieval:
    def __init__(self, layer: int, keys: torch.Tensor, values: torch.Tensor, two_sigma2: float, opts: KnnMoeOptions):
        self.layer = layer
        self.normalize = opts.similarity in ("rbf_l2", "cosine")
        keys = keys.float().numpy()
        self.index = knn_index.build_index(l2_normalize(keys) if self.normalize else keys, opts.index, opts.nprobe)
        self.values = values  # (n, E) fp32, moved to the model's device on first use
        self.two_sigma2 = two_sigma2


class Retriever:
    """Hook transform that mixes each router's logits with its memory's neighbours."""

    def __init__(self, model: torch.nn.Module, memory: Memory, options: KnnMoeOptions):
        self.sites = find_routers(model)
        memory.check_matches(model_signature(model, self.sites))
        self.options = options
        self.layers: dict[int, _LayerRetrieval] = {}
        for site in self.sites:
            mem = memory.layers[site.layer]
            if len(mem) == 0:
                continue  # nothing stored for this layer: its router runs as stock
            if options.k > len(mem):
                raise KnnMoeError(
                    f"k={options.k} but layer {site.layer} of memory {memory.path} holds only {len(mem)} keys; "
                    f"use k <= {len(mem)} or a larger memory"
                )
            self.layers[site.layer] = _LayerRetrieval(
                site.layer, mem.keys, mem.values, self._two_sigma2(mem.stats, site.layer, memory.path), options
            )
        self.token_mask: torch.Tensor | None = None  # (n_tokens,) bool: rows to search, when padding is known
        self.reset_diagnostics()

    def _two_sigma2(self, stats: dict, layer: int, path: Path) -> float:
        if self.options.similarity == "cosine":
            return 1.0  # cosine similarity has no bandwidth
        if self.options.sigma is not None:
            return 2.0 * self.options.sigma**2
        stat = stats["mean_nn_sq_dist_l2" if self.options.similarity != "rbf" else "mean_nn_sq_dist"]
        if not stat:
            raise KnnMoeError(
                f"sigma=auto needs at least two distinct keys per layer, and layer {layer} of {path} has not; "
                "pass sigma=<number>"
            )
        return stat  # 2 sigma^2 = mean squared nearest-neighbour distance inside the memory

    def reset_diagnostics(self) -> None:
        self._stats = {s.layer: torch.zeros(3, dtype=torch.float64) for s in self.sites}  # sum lambda, changed, n

    def diagnostics(self) -> dict:
        out = {}
        for layer, (lam, changed, n) in self._stats.items():
            n = max(n.item(), 1.0)
            out[str(layer)] = {"mean_lambda": lam.item() / n, "topk_changed": changed.item() / n, "tokens": int(n)}
        return out

    def __call__(self, site: RouterSite, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        layer = self.layers.get(site.layer)
        if layer is None:
            return z
        rows = None
        if self.token_mask is not None and self.token_mask.numel() == h.shape[0]:
            rows = self.token_mask.to(h.device).nonzero().squeeze(-1)
        q = (h if rows is None else h[rows]).detach().float()  # (m, d)
        if torch.isnan(q).any():
            raise KnnMoeError(f"NaN in the router input of layer {site.layer}: the model's forward produced NaN")
        q = q.cpu().numpy()
        dist2, ids = knn_index.search(layer.index, l2_normalize(q) if layer.normalize else q, self.options.k)
        dist2 = torch.from_numpy(dist2).to(z.device)  # (m, k)
        ids = torch.from_numpy(ids).to(z.device)
        if layer.values.device != z.device:
            layer.values = layer.values.to(z.device)
        sims = similarity(dist2, self.options.similarity, layer.two_sigma2, self.options.max_distance)
        z_sub = z if rows is None else z[rows]
        mixed, lam = mix(z_sub, layer.values[ids], sims)  # (m, E), (m,)
        _, before = site.gate(z_sub)
        _, after = site.gate(mixed)
        changed = (before.sort(-1).values != after.sort(-1).values).any(-1)
        self._stats[site.layer] += torch.tensor([lam.sum().item(), changed.sum().item(), lam.numel()], dtype=torch.float64)
        if rows is None:
            return mixed
        out = z.clone()
        out[rows] = mixed
        return out


@contextmanager
def attach(model: torch.nn.Module, memory: str | Path | Memory, **options) -> Iterator[Retriever]:
    """Route `model` with kNN-MoE inside the with-block; the model is untouched after it.

        with knnmoe_eval.attach(model, "memories/medmcqa", k=1) as retriever:
            model(input_ids)
        print(retriever.diagnostics())
    """
    mem = memory if isinstance(memory, Memory) else load_memory(memory, verify=options.get("verify", True))
    opts = replace(KnnMoeOptions(memory=str(mem.path)), **options)
    retriever = Retriever(model, mem, opts)
    with hooked_routers(retriever.sites, retriever, check_fired=False):
        yield retriever
