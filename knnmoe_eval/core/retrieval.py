"""Retrieval at inference: one faiss index per MoE layer, queried once per layer per forward for all tokens.

`Retriever` is the hook transform for evaluation (see `hooks.py`): router input h -> k nearest keys -> `mixing`.
It is built once per model and memory (the memory is validated against the model there, before any forward),
and keeps per-layer diagnostics: mean lambda, the fraction of tokens whose top-k expert set changed, and the
mean share of the similarity mass taken by the nearest neighbour (over tokens with lambda > 0).
`attach(model, memory)` is the public entry point for any HF MoE model outside lm-eval.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ..errors import KnnMoeError
from . import index as knn_index
from .files import write_json_atomic
from .hooks import Rerouted, hooked_routers
from .hub import resolve_memory
from .index import l2_normalize
from .memory import Memory, load_memory
from .mixing import agree_with_earlier, mix, similarity, within_radius
from .options import KnnMoeOptions
from .routers import RouterSite, find_routers
from .sigma import two_sigma2
from .signature import model_signature

log = logging.getLogger(__name__)


class _LayerRetrieval:
    """One layer's index and values, on the device that holds the layer (each GPU its own layers' indexes).

    Every index goes through `search`: one batched index search for all tokens, then, for re-ranked indexes, the
    candidates' true distances (`index.rerank`).
    """

    def __init__(self, site: RouterSite, memory: Memory, options: KnnMoeOptions):
        self.layer = site.layer
        self.normalize = options.similarity in ("rbf_l2", "cosine")
        mem = memory.layers[site.layer]
        n, d = mem.keys.shape
        self.plan = knn_index.plan(options.index, d, n, options.nprobe)
        self.factory = self.plan.factory
        self.device = site.weight.device
        if self.plan.exact and site.decoder_layer is not None:  # vLLM's layers are not transformers' modules
            macs = knn_index.layer_macs_per_token(site.decoder_layer, site.num_experts, site.top_k)
            knn_index.warn_if_exact_dominates(str(memory.path), n, d, macs)
        if self.plan.exact and self.device.type == "cuda":  # a torch matmul on the device: faiss not needed
            self.index, self.cpu_index = knn_index.TorchExactIndex(mem.keys, self.device, self.normalize), None
        else:
            entry = memory.manifest["layers"][str(site.layer)]
            self.cpu_index = knn_index.load_or_build(mem.keys, self.factory, self.plan.nprobe, self.normalize,
                                                     memory.path, site.layer, entry.get("sha256"))
            self.index = knn_index.to_device(self.cpu_index, self.device)
        self.on_device = isinstance(self.index, (knn_index.GpuIndex, knn_index.TorchExactIndex))
        # re-ranked indexes read their candidates' fp16 keys: on the CPU the memory-mapped keys themselves (only
        # the candidate rows are read), on a GPU a copy
        self.keys = mem.keys.to(self.device) if self.plan.rerank else None  # (n, d) fp16
        if self.keys is not None:
            self.key_norm = knn_index.key_norms(self.keys, self.device)  # (n,)
            self.score_dtype = knn_index.score_dtype(self.key_norm)
        self.values = mem.values.to(self.device)  # (n, E) fp32
        self.radius = mem.stats.get("radius_l2" if self.normalize else "radius")  # confidence=radius's cut-off
        # ivfpq returns its own distances (PCA space, 8-bit codes): its bandwidth is measured in that space
        in_index_space = None if self.plan.true_distances else (
            lambda: knn_index.index_nn_sq_dists(self.cpu_index, mem.keys, self.normalize))
        self.two_sigma2 = 1.0 if options.confidence == "radius" else two_sigma2(
            options.similarity, options.sigma, mem.stats, self.layer, memory.path, in_index_space)

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances (m, k) fp32 and ids (m, k) of the k nearest keys to the queries q (m, d) fp32.

        Re-ranked indexes return true distances; `ivfpq` returns its own (inf and id 0 where fewer than k
        were found, which gives similarity 0)."""
        wanted = min(k * knn_index.RERANK, self.keys.shape[0]) if self.plan.rerank else k
        if self.on_device:  # searched on the layer's GPU: no host round trip
            dist2, ids = self.index.search(F.normalize(q, dim=-1, eps=1e-12) if self.normalize else q, wanted)
        else:
            q_np = q.cpu().numpy()
            dist2, ids = knn_index.search(self.index, l2_normalize(q_np) if self.normalize else q_np, wanted)
            dist2, ids = torch.from_numpy(dist2).to(q.device), torch.from_numpy(ids).to(q.device)
        if self.plan.rerank:
            q = F.normalize(q, dim=-1, eps=1e-12) if self.normalize else q
            return knn_index.rerank(q, ids, self.keys, self.key_norm, k, self.normalize, self.score_dtype)
        found = ids >= 0  # IVF returns -1 when the probed lists hold fewer than k keys
        return dist2.masked_fill(~found, float("inf")), ids.clamp_min(0)


class Retriever:
    """Hook transform that mixes each router's logits with its memory's neighbours."""

    def __init__(self, model: torch.nn.Module, memory: Memory, options: KnnMoeOptions,
                 sites: list[RouterSite] | None = None):
        self.sites = sites if sites is not None else find_routers(model)  # callers that already looked pass them
        memory.check_matches(model_signature(model, self.sites))
        memory.check_preset(options.preset)
        self.options = options
        self.layers: dict[int, _LayerRetrieval] = {}
        host_keys = [memory.layers[s.layer].keys for s in self.sites if s.weight.device.type != "cuda"]
        knn_index.check_exact_fits(str(memory.path), sum(  # exact copies of the (n, d) fp16 keys in host RAM
            k.numel() * k.element_size() for k in host_keys
            if len(k) and knn_index.plan(options.index, k.shape[1], k.shape[0]).exact
        ))
        for site in self.sites:
            mem = memory.layers[site.layer]
            if len(mem) == 0:
                continue  # nothing stored for this layer: its router runs as stock
            if options.confidence == "radius" and mem.stats.get("radius") is None:
                raise KnnMoeError(
                    f"confidence=radius needs each layer's radius, and layer {site.layer} of {memory.path} has none: "
                    "build the memory with radius_quantile=<q> (preset=plus does), or evaluate with confidence=kernel"
                )
            if options.k > len(mem):
                raise KnnMoeError(
                    f"k={options.k} but layer {site.layer} of memory {memory.path} holds only {len(mem)} keys; "
                    f"use k <= {len(mem)} or a larger memory"
                )
            self.layers[site.layer] = _LayerRetrieval(site, memory, options)
        # confidence=radius: the tokens within reach at every layer so far in this forward (mixing.agree_with_earlier)
        self._first, self._near = min(self.layers, default=None), None
        self.reset_diagnostics()

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

    def publish_diagnostics(self) -> dict:
        return publish_diagnostics(self.options, self.diagnostics())

    def __call__(self, site: RouterSite, h: torch.Tensor, z: torch.Tensor,
                 token_mask: torch.Tensor | None = None) -> torch.Tensor | Rerouted:
        """The hook transform: the rows with lambda > 0, routed by their mixed logits (`hooks.Rerouted`); every
        other row keeps the stock router's own output. z itself for a layer with no memory.

        token_mask: (n_tokens,) bool, the rows to search when padding is known (generation's attention mask);
        bind it with `functools.partial` for one forward. Rows outside it are neither searched nor counted."""
        layer = self.layers.get(site.layer)
        if layer is None:
            return z
        rows = None
        if token_mask is not None and token_mask.numel() == h.shape[0]:
            rows = token_mask.to(h.device).nonzero().squeeze(-1)
        q = (h if rows is None else h[rows]).detach().float()  # (m, d)
        if torch.isnan(q.sum()):  # one reduction instead of an (m, d) mask: a NaN anywhere makes the sum NaN
            raise KnnMoeError(f"NaN in the router input of layer {site.layer}: the model's forward produced NaN")
        dist2, ids = layer.search(q, self.options.k)  # (m, k) each, on the layer's device
        dist2, ids = dist2.to(z.device), ids.to(z.device)
        if self.options.confidence == "radius":
            radius = min(layer.radius, self.options.max_distance or float("inf"))
            sims, self._near = agree_with_earlier(within_radius(dist2, radius),
                                                  None if site.layer == self._first else self._near)
        else:
            sims = similarity(dist2, self.options.similarity, layer.two_sigma2, self.options.max_distance)
        z_sub = z if rows is None else z[rows]
        mixed, lam = mix(z_sub, layer.values[ids], sims)  # (m, E), (m,)
        near = (lam > 0).nonzero().squeeze(-1)  # (c,) the searched rows whose proposal is mixed in at all
        moved = near if rows is None else rows[near]  # (c,) the same, as rows of the batch
        selection = site.gate(mixed[near], h.dtype)  # handed to the hook, which would otherwise gate a second time
        _, before = site.gate(z_sub[near], h.dtype)  # lambda = 0 rows are stock by construction: never changed
        changed = (before.sort(-1).values != selection[1].sort(-1).values).any(-1)
        share = sims[near, 0] / sims[near].sum(-1)  # neighbours come nearest first: s_1 is the largest
        # summed on the logits' device: no host sync per layer and forward (a GPU run never waits on them)
        step = torch.stack([lam.sum(), changed.sum(), lam.new_tensor(lam.numel()), share.sum(),
                            lam.new_tensor(near.numel())])
        stats = self._stats[site.layer]
        if stats.device != step.device:
            stats = self._stats[site.layer] = stats.to(step.device)
        stats += step.to(stats.dtype)
        out = z.clone()
        out[moved] = mixed[near]
        return Rerouted(out, moved, selection)


def publish_diagnostics(options: KnnMoeOptions, diagnostics: dict) -> dict:
    """The run's diagnostics, logged per layer and written to `diagnostics=FILE` when asked (hf- and vllm-knnmoe)."""
    for layer, d in diagnostics.items():
        log.info("kNN-MoE layer %s: mean lambda %.3f, top-k changed %.1f%% of %d tokens", layer,
                 d["mean_lambda"], 100 * d["topk_changed"], d["tokens"])
    if options.diagnostics:
        write_json_atomic(Path(options.diagnostics), diagnostics)
    return diagnostics


@contextmanager
def attach(model: torch.nn.Module, memory: str | Path | Memory, **options) -> Iterator[Retriever]:
    """Route `model` with kNN-MoE inside the with-block; the model is untouched after it.

        with knnmoe_eval.attach(model, "memories/medmcqa", k=1) as retriever:
            model(input_ids)
        print(retriever.diagnostics())
    """
    mem = memory if isinstance(memory, Memory) else load_memory(  # a directory, or a Hub repo id (hub.py)
        resolve_memory(memory, options.get("memory_revision", "main")).path, verify=options.get("verify", True))
    resolved = KnnMoeOptions(**{"memory": str(mem.path), **options})
    retriever = Retriever(model, mem, resolved)
    with hooked_routers(retriever.sites, retriever, check_fired=False):
        yield retriever
