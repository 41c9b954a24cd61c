"""Memory pruning (the paper's future work): a smaller memory that routes (almost) the same.

Two kinds of entries cost search time and bytes for nothing:

* entries whose value barely changes the routing: the family's gating of z* picks the same experts as the
  gating of the stock logits z = W key (+ b), with routing weights within `min_change` of each other. Mixing
  such a value in moves nothing, yet its high similarity still counts in lambda, so it only dilutes better
  neighbours;
* near-duplicate keys: a key within `dedup` x the memory's typical nearest-neighbour distance of a key kept
  before it is dropped (greedily, in memory order); the kept one answers for both.

The pruned copy is an ordinary memory, streamed chunk by chunk from the memory-mapped original
(`write_memory_streamed`); its manifest records what was dropped.

    knnmoe-memory prune memories/X --pretrained M --out memories/X-pruned --min-change 0.02
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import KnnMoeError
from .memory import LayerMemory, Memory, load_memory, write_memory_streamed
from .routers import RouterSite, find_routers
from .signature import model_signature

log = logging.getLogger(__name__)
_CHUNK = 4096


def routing_unchanged(site: RouterSite, keys: torch.Tensor, values: torch.Tensor, min_change: float) -> torch.Tensor:
    """(n,) bool: the value routes each key to the same experts as its stock logits, weights within min_change."""
    out = torch.empty(keys.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for start in range(0, keys.shape[0], _CHUNK):
            k = keys[start : start + _CHUNK].to(site.weight)
            z = site.logits(k)  # (m, E) stock logits
            v = values[start : start + _CHUNK].to(z)
            w_stock, e_stock = site.gate(z)
            w_mem, e_mem = site.gate(v)
            same = (e_stock.sort(-1).values == e_mem.sort(-1).values).all(-1)
            # compare weights expert by expert: scatter both into (m, E)
            dense_stock = torch.zeros_like(z).scatter(-1, e_stock, w_stock.to(z.dtype))
            dense_mem = torch.zeros_like(z).scatter(-1, e_mem, w_mem.to(z.dtype))
            close = (dense_stock - dense_mem).abs().amax(-1) <= min_change
            out[start : start + _CHUNK] = (same & close).cpu()
    return out


def near_duplicates(keys: torch.Tensor, radius: float) -> torch.Tensor:
    """(n,) bool: keys within `radius` of a key kept before them (greedy, in order)."""
    import faiss

    n, d = keys.shape
    dup = torch.zeros(n, dtype=torch.bool)
    kept = faiss.IndexFlatL2(d)
    r2 = radius**2
    for start in range(0, n, _CHUNK):
        x = keys[start : start + _CHUNK].float().numpy()
        if kept.ntotal:
            dist, _ = kept.search(x, 1)
            covered = dist[:, 0] <= r2
        else:
            covered = np.zeros(len(x), dtype=bool)
        within = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) <= r2  # (m, m) inside this chunk
        keep = np.zeros(len(x), dtype=bool)
        for i in range(len(x)):
            keep[i] = not covered[i] and not (within[i, :i] & keep[:i]).any()
        kept.add(x[keep])
        dup[start : start + len(x)] = torch.from_numpy(~keep)
    return dup


def _kept_rows(layer: LayerMemory, keep: torch.Tensor):
    for start in range(0, len(layer), _CHUNK):
        rows = keep[start : start + _CHUNK]
        yield layer.keys[start : start + _CHUNK][rows], layer.values[start : start + _CHUNK][rows]


def prune_memory(memory: str | Path | Memory, out_dir: str | Path, model: torch.nn.Module,
                 min_change: float | None = None, dedup: float | None = None) -> tuple[Path, dict]:
    """Write a pruned copy of `memory` to `out_dir`; returns its path and per-layer (before, after) counts."""
    mem = memory if isinstance(memory, Memory) else load_memory(memory)
    sites = find_routers(model)
    signature = model_signature(model, sites)
    mem.check_matches(signature)
    if min_change is None and dedup is None:
        raise KnnMoeError("prune_memory needs min_change=<routing weight change> and/or dedup=<fraction of the NN "
                          "distance>")
    rows, counts = {}, {}
    for site in sites:
        layer = mem.layers[site.layer]
        drop = torch.zeros(len(layer), dtype=torch.bool)
        if min_change is not None and len(layer):
            drop |= routing_unchanged(site, layer.keys, layer.values, min_change)
        if dedup is not None and len(layer):
            nn2 = layer.stats.get("mean_nn_sq_dist") or 0.0
            keep_idx = (~drop).nonzero().squeeze(-1)
            dup = near_duplicates(layer.keys[keep_idx], dedup * math.sqrt(nn2))
            drop[keep_idx[dup]] = True
        rows[site.layer] = (int((~drop).sum()), _kept_rows(layer, ~drop))
        counts[str(site.layer)] = (len(layer), int((~drop).sum()))
    build = {**mem.manifest.get("build", {}), "pruned_from": str(mem.path),
             "pruning": {"min_change": min_change, "dedup": dedup, "keys_before_after": counts}}
    return write_memory_streamed(out_dir, rows, mem.signature, build=build), counts

