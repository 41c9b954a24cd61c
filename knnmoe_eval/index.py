"""Nearest-neighbour search over one layer's keys, with faiss.

Indexes are named by faiss factory strings and search parameters by faiss parameter strings, so a memory's
index is described by two short strings. `exact` is the paper's default: keys stored fp16 and searched
exhaustively ("SQfp16" stores exactly the fp16 keys and computes exact L2 distances on them).
"""

from __future__ import annotations

import numpy as np

NAMED = {"exact": "SQfp16"}


def factory_string(index: str) -> str:
    return NAMED.get(index, index)


def build_index(keys: np.ndarray, index: str = "exact", nprobe: int = 32):
    """A faiss L2 index over `keys` (n, d) float32."""
    import faiss

    idx = faiss.index_factory(keys.shape[1], factory_string(index), faiss.METRIC_L2)
    if not idx.is_trained:
        idx.train(keys)
    idx.add(keys)
    if "IVF" in factory_string(index):
        faiss.ParameterSpace().set_index_parameters(idx, f"nprobe={nprobe}")
    return idx


def search(idx, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 distances (m, k) float32 and ids (m, k) int64 of each query's k nearest keys, one batched call."""
    return idx.search(np.ascontiguousarray(queries, dtype=np.float32), k)
