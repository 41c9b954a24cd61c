"""Retrieval at inference: one faiss index per MoE layer, queried once per layer per forward for all tokens.

`Retriever` is the hook transform for evaluation (see `hooks.py`): router input h -> k nearest keys -> `mixing`.
It is built once per model and memory (the memory is validated against the model there, before any forward),
and keeps per-layer diagnostics: mean lambda, the fraction of tokens whose top-k expert set changed, and the
mean share of the similarity mass taken by the nearest neighbour (over tokens with lambda > 0).
`attach(model, memory)` is the public entry point for any HF MoE model outside lm-eval.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from . import index as knn_index
from .errors import KnnMoeError
from .families import RouterSite, find_routers
from .hooks import hooked_routers
from .memory import Memory, l2_normalize, load_memory, model_signature
from .mixing import mix, similarity, within_radius
from .options import KnnMoeOptions, resolve


class _LayerRetrieval:
    """One layer's index and values, on the device that holds the layer (each GPU its own layers' indexes)."""

    def __init__(self, site: RouterSite, model: torch.nn.Module, memory: Memory, two_sigma2: float,
                 opts: KnnMoeOptions):
        self.layer = site.layer
        self.normalize = opts.similarity in ("rbf_l2", "cosine")
        mem = memory.layers[site.layer]
        n, d = mem.keys.shape
        self.factory = knn_index.factory_string(opts.index, d, n)
        self.device = site.module.weight.device
        if knn_index.is_exact(self.factory):
            decoder_layer = model.get_submodule(site.name.rsplit(".", 2)[0])
            macs = knn_index.layer_macs_per_token(decoder_layer, site.num_experts, int(site.module.top_k))
            knn_index.warn_if_exact_dominates(str(memory.path), n, d, macs)
        entry = memory.manifest["layers"][str(site.layer)]
        cpu_index = knn_index.load_or_build(mem.keys, self.factory, opts.nprobe, self.normalize, memory.path,
                                            site.layer, entry.get("sha256"))
        self.index = knn_index.to_device(cpu_index, self.device)
        self.on_device = isinstance(self.index, knn_index.GpuIndex)
        # approximate indexes re-rank their candidates on the fp16 keys: on the CPU the memory-mapped keys
        # themselves (only the candidate rows are read), on a GPU a copy
        self.keys = None if knn_index.is_exact(self.factory) else mem.keys.to(self.device)  # (n, d) fp16
        if self.keys is not None:
            self.key_sq = torch.cat([self._unit(c.float()).pow(2).sum(-1) for c in self.keys.split(65_536)])  # (n,)
        self.values = mem.values.to(self.device)  # (n, E) fp32
        self.two_sigma2 = two_sigma2
        self.radius = mem.stats.get("radius_l2" if self.normalize else "radius")  # confidence=radius's cut-off

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances (m, k) fp32 and ids (m, k) of the k nearest keys to the queries q (m, d) fp32."""
        wanted = k if self.keys is None else min(k * knn_index.RERANK, self.keys.shape[0])
        if self.on_device:  # faiss-gpu searches the CUDA tensor in place: no host round trip
            dist2, ids = self.index.search(F.normalize(q, dim=-1, eps=1e-12) if self.normalize else q, wanted)
        else:
            q_np = q.cpu().numpy()
            dist2, ids = knn_index.search(self.index, l2_normalize(q_np) if self.normalize else q_np, wanted)
            dist2, ids = torch.from_numpy(dist2).to(q.device), torch.from_numpy(ids).to(q.device)
        if self.keys is None:
            return dist2, ids
        # approximate distances (PCA and PQ shrink them) would skew the similarity and sigma=auto, which are
        # defined on true distances: re-rank the candidates by their true distance to the query
        found = ids >= 0  # IVF returns -1 when the probed lists hold fewer candidates
        ids = ids.clamp_min(0)
        candidates = self._unit(self.keys.index_select(0, ids.reshape(-1)).float()).view(*ids.shape, -1)  # (m, r, d)
        q = self._unit(q)
        # ||q - c||^2 = ||c||^2 - 2 c.q + ||q||^2: one pass over the candidates instead of a (m, r, d) difference
        dot = torch.bmm(candidates, q.unsqueeze(-1)).squeeze(-1)  # (m, r)
        dist2 = self.key_sq[ids] - 2 * dot + q.pow(2).sum(-1, keepdim=True)
        dist2 = dist2.clamp_min(0).masked_fill(~found, float("inf"))
        dist2, order = dist2.topk(k, dim=-1, largest=False)  # (m, k)
        return dist2, ids.gather(1, order)

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, eps=1e-12) if self.normalize else x


class Retriever:
    """Hook transform that mixes each router's logits with its memory's neighbours."""

    def __init__(self, model: torch.nn.Module, memory: Memory, options: KnnMoeOptions,
                 sites: list[RouterSite] | None = None):
        self.sites = sites if sites is not None else find_routers(model)  # callers that already looked pass them
        memory.check_matches(model_signature(model, self.sites))
        memory.check_preset(options.preset)
        self.options = options
        self.layers: dict[int, _LayerRetrieval] = {}
        layer_keys = [memory.layers[s.layer].keys for s in self.sites]  # (n, d) fp16 each, memory-mapped
        knn_index.check_exact_fits(str(memory.path), sum(
            k.numel() * k.element_size() for k in layer_keys
            if len(k) and knn_index.is_exact(knn_index.factory_string(options.index, k.shape[1], k.shape[0]))
        ))
        for site in self.sites:
            mem = memory.layers[site.layer]
            if len(mem) == 0:
                continue  # nothing stored for this layer: its router runs as stock
            if options.k > len(mem):
                raise KnnMoeError(
                    f"k={options.k} but layer {site.layer} of memory {memory.path} holds only {len(mem)} keys; "
                    f"use k <= {len(mem)} or a larger memory"
                )
            if options.confidence == "radius" and mem.stats.get("radius") is None:
                raise KnnMoeError(
                    f"confidence=radius needs each layer's radius, and layer {site.layer} of {memory.path} has none: "
                    "build the memory with radius_quantile=<q> (preset=plus does), or evaluate with confidence=kernel"
                )
            self.layers[site.layer] = _LayerRetrieval(
                site, model, memory, self._two_sigma2(mem.stats, site.layer, memory.path), options
            )
        self.token_mask: torch.Tensor | None = None  # (n_tokens,) bool: rows to search, when padding is known
        self.reset_diagnostics()

    def _two_sigma2(self, stats: dict, layer: int, path: Path) -> float:
        if self.options.similarity == "cosine" or self.options.confidence == "radius":
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
        # per layer: sum lambda, tokens whose top-k changed, tokens, sum top-1 share, tokens with lambda > 0
        self._stats = {s.layer: torch.zeros(5, dtype=torch.float64) for s in self.sites}

    def diagnostics(self) -> dict:
        """Per layer: mean lambda and top-k change over all searched tokens; `top1_share` = mean of
        s_1 / sum_i s_i (the nearest neighbour's share of the similarity mass) over tokens with lambda > 0,
        None when there were none. 1.0 means the proposal is the nearest value alone, 1/k an even average."""
        out = {}
        for layer, stats in self._stats.items():
            lam, changed, n, top1, confident = stats.cpu()
            n = max(n.item(), 1.0)
            out[str(layer)] = {"mean_lambda": lam.item() / n, "topk_changed": changed.item() / n, "tokens": int(n),
                               "top1_share": top1.item() / confident.item() if confident.item() else None}
        return out

    def __call__(self, site: RouterSite, h: torch.Tensor, z: torch.Tensor):
        """Mixed logits for the hook, with their gating (z unchanged for a layer with no memory)."""
        layer = self.layers.get(site.layer)
        if layer is None:
            return z
        rows = None
        if self.token_mask is not None and self.token_mask.numel() == h.shape[0]:
            rows = self.token_mask.to(h.device).nonzero().squeeze(-1)
        q = (h if rows is None else h[rows]).detach().float()  # (m, d)
        if torch.isnan(q).any():
            raise KnnMoeError(f"NaN in the router input of layer {site.layer}: the model's forward produced NaN")
        dist2, ids = layer.search(q, self.options.k)  # (m, k) each, on the layer's device
        dist2, ids = dist2.to(z.device), ids.to(z.device)
        if self.options.confidence == "radius":
            radius = min(layer.radius, self.options.max_distance or float("inf"))
            sims = within_radius(dist2, radius)
        else:
            sims = similarity(dist2, self.options.similarity, layer.two_sigma2, self.options.max_distance)
        z_sub = z if rows is None else z[rows]
        mixed, lam = mix(z_sub, layer.values[ids], sims)  # (m, E), (m,)
        if rows is None:
            out = mixed
        else:
            out = z.clone()
            out[rows] = mixed
        gated = site.gate(out)  # handed to the hook, which would otherwise gate `out` a second time
        _, before = site.gate(z_sub)
        after = gated[1] if rows is None else gated[1][rows]
        changed = (before.sort(-1).values != after.sort(-1).values).any(-1)
        confident = lam > 0  # (m,) tokens whose proposal was mixed in at all
        share = sims[confident, 0] / sims[confident].sum(-1)  # neighbours come nearest first: s_1 is the largest
        # summed on the logits' device: no host sync per layer and forward (a GPU run never waits on them)
        step = torch.stack([lam.sum(), changed.sum(), lam.new_tensor(lam.numel()), share.sum(), confident.sum()])
        stats = self._stats[site.layer]
        if stats.device != step.device:
            stats = self._stats[site.layer] = stats.to(step.device)
        stats += step.to(stats.dtype)
        return out, gated


@contextmanager
def attach(model: torch.nn.Module, memory: str | Path | Memory, **options) -> Iterator[Retriever]:
    """Route `model` with kNN-MoE inside the with-block; the model is untouched after it.

        with knnmoe_eval.attach(model, "memories/medmcqa", k=1) as retriever:
            model(input_ids)
        print(retriever.diagnostics())
    """
    mem = memory if isinstance(memory, Memory) else load_memory(memory, verify=options.get("verify", True))
    opts = resolve({"memory": str(mem.path), **options})
    retriever = Retriever(model, mem, opts)
    with hooked_routers(retriever.sites, retriever, check_fired=False):
        yield retriever
