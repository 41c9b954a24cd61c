"""Nearest-neighbour search over one layer's keys, with faiss (or torch, for exact search on a GPU).

Indexes are named by faiss factory strings and search parameters by faiss parameter strings, so a memory's
index is described by two short strings. Four names stand for the choices worth knowing (`plan` below):

    exact         "SQfp16": keys stored fp16, searched exhaustively (exact L2 on the fp16 keys); the paper's
                  default
    ivfpq         "PCA{d/8},IVF{nlist},SQ8", nprobe 32, no re-ranking: the paper's kNN-MoE (IVFPQ) as its text
                  describes it ("quantize the FP16 index to 8-bit, search across only 32 centroids, compress the
                  hidden dimension to one-eighth"; 1 byte per PCA dimension, which is what its exact-to-IVFPQ
                  size ratio fits). Distances are the ones faiss returns, in the PCA space
    ivfpq_rerank  "PCA{d/8},IVF{nlist},PQ{m}x{bits}np", nprobe 8, re-ranked: ours, 8x smaller codes (32 bytes per
                  key) and RERANK x k candidates re-ranked by their true distance on the fp16 keys. The "np" suffix
                  skips faiss's polysemous training, which took minutes per layer at d = 2048 and buys nothing here
    hnsw          "PCA{d/8},HNSW32", re-ranked: a graph over PCA-reduced float32 keys (1 KB per key at d = 2048)

nlist grows as ~4 sqrt(N). Small memories get what their keys can train, never a faiss error: nlist at most
N/39 (k-means' points per centroid) and PCA to min(d/8, N) dimensions (a PCA fitted on N points has at most N
components: GPQA's 250 references per layer train PCA250, not d/8 = 256 or gpt-oss's 360). The factory a run used
is in its results JSON (`config.knnmoe.index`). Anything else is passed to `faiss.index_factory` as is, and re-ranked. Re-ranked
indexes hand retrieval true squared distances, so similarities, sigma=auto and max_distance keep their meaning;
`ivfpq` hands it the index's own (PCA, 8-bit) distances, and its sigma=auto is measured in that same space
(`index_nn_sq_dist`).

Indexes that need training are saved next to the memory as `index/layer_XXX.<spec hash>.faiss` with a JSON
sidecar, written last, holding the file's sha256 and what the index was made from: the layer file's sha256 (the
memory's keys, under the manifest's checksums), the factory string, normalization and the training settings. A
saved index is used only when all of that matches and the index itself agrees with the memory: as many keys, of
the memory's dimension, the factory's structure, and a seeded sample of the layer's own keys finding themselves
in it (an index trained on other keys, with its sidecar edited to match, fails that). Anything else (another
memory's index, a corrupted or truncated file, one faiss cannot read) is refused with a warning saying why and
retrained in its place, never used. A faiss index file is plain data (faiss has no code-carrying
serialization), so loading one cannot run code.

Training runs on a seeded sample and keys are converted and added in chunks, so a layer never needs a float32
copy of all its keys; with the memory's memory-mapped keys, an approximate index is built without the layer's
keys ever being resident. Exact search is the exception by nature: its index is a copy of every key, so a memory
whose exact indexes would not fit in the available RAM is refused at setup. On a GPU, exact search is a torch
matmul over the fp16 keys on the layer's device (no faiss needed); approximate indexes need faiss-gpu, imported
only when a layer lives on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import KnnMoeError
from .files import atomic_path, sha256_file

log = logging.getLogger(__name__)

EXACT = "SQfp16"
INDEX_DIR = "index"
SIDECAR_FORMAT = 2  # 2: the training settings are part of the spec, and the index is checked against the keys
_CHUNK = 65_536  # keys converted to float32 and added per call
_TRAIN_MIN = 32_768  # PCA and PQ want many more points than the IVF centroids alone
_POINTS_PER_CENTROID = 39  # below this faiss's k-means warns that it has too few points
_NN_SAMPLE = 2048  # keys searched for ivfpq's sigma statistic, as many as memory.py samples for the true one
_SELF_SAMPLE, _SELF_K, _SELF_FOUND = 64, 16, 0.5  # a saved index's own keys must find themselves in it
# re-ranked indexes return this many times k candidates, re-ranked by their true distance to the query: PQ
# codes alone place the true nearest key first only ~1/5 of the time at d = 2048 (see docs/retrieval.md)
RERANK = 8


@dataclass(frozen=True)
class IndexPlan:
    """How one layer is searched: the faiss factory, IVF lists probed, and whether candidates are re-ranked."""

    factory: str
    nprobe: int
    rerank: bool

    @property
    def exact(self) -> bool:
        return self.factory == EXACT

    @property
    def true_distances(self) -> bool:
        """Whether search returns true squared L2 distances (else the index's own, e.g. in PCA space)."""
        return self.exact or self.rerank


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _pow2(x: float, rounding=math.floor) -> int:
    return 1 << max(0, int(rounding(math.log2(max(x, 1.0)))))


def _nlist(n: int) -> int:
    """~4 sqrt(n) IVF lists (a power of two), capped so that each list's centroid trains on >= 39 points."""
    return min(_pow2(4 * math.sqrt(n), round), _pow2(n / _POINTS_PER_CENTROID))


def _pca_dims(d: int, n: int) -> int:
    """d/8 (the paper's reduction), bounded by the n keys that train the PCA."""
    return max(1, min(d // 8, n))


def ivfpq_paper_factory(d: int, n: int) -> str:
    """The paper's IVFPQ for `n` keys of dimension `d`: PCA to d/8, IVF, 8-bit scalar codes (1 byte per dimension)."""
    return f"PCA{_pca_dims(d, n)},IVF{_nlist(n)},SQ8"


def ivfpq_rerank_factory(d: int, n: int) -> str:
    """Our IVFPQ: PCA to d/8, IVF, 8-bit product-quantizer codes of at most 32 bytes per key.

    Small memories cannot train 256 centroids per sub-quantizer with enough points, so the code bits shrink to
    keep >= 39 training points per centroid; at d = 2048 and N >= 10k the result is PCA256,IVF{nlist},PQ32x8np.
    """
    d_pca = _pca_dims(d, n)
    m = max(s for s in range(1, min(32, d_pca) + 1) if d_pca % s == 0)  # sub-quantizers: <= 32 bytes per key
    bits = min(8, max(4, int(math.floor(math.log2(max(n / _POINTS_PER_CENTROID, 1.0))))))
    return f"PCA{d_pca},IVF{_nlist(n)},PQ{m}x{bits}np"


def plan(index: str, d: int, n: int, nprobe: int | None = None) -> IndexPlan:
    """What `index` (a name above or a factory string) means for n keys of dimension d; nprobe None: its default."""
    if index == "exact":
        return IndexPlan(EXACT, 1, rerank=False)
    if index == "ivfpq":
        return IndexPlan(ivfpq_paper_factory(d, n), nprobe or 32, rerank=False)
    if index == "ivfpq_rerank":
        return IndexPlan(ivfpq_rerank_factory(d, n), nprobe or 8, rerank=True)
    if index == "hnsw":
        return IndexPlan(f"PCA{_pca_dims(d, n)},HNSW32", nprobe or 8, rerank=True)
    import faiss

    try:  # parsed now, at setup, so that a typo is not a raw faiss error (or a failure mid-evaluation)
        faiss.index_factory(d, index, faiss.METRIC_L2)
    except RuntimeError as e:
        why = str(e).splitlines()[0].rpartition(": ")[2]  # faiss prefixes its C++ location
        raise KnnMoeError(
            f"model_arg index={index!r} is neither exact, ivfpq, ivfpq_rerank, hnsw nor a faiss factory string for "
            f"keys of dimension {d} ({why}); choose one of those, or a factory string such as IVF64,Flat, which on "
            f"the lm_eval command line goes in its own JSON --model_args (key=value model_args split on commas): "
            f"""--model_args pretrained=...,memory=... --model_args '{{"index": "IVF64,Flat"}}'"""
        ) from None
    return IndexPlan(index, nprobe or 8, rerank=index != EXACT)


def _float32(keys: torch.Tensor, normalize: bool) -> np.ndarray:
    x = keys.float().numpy()
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def _train_sample(keys: torch.Tensor, nlist: int, normalize: bool, seed: int = 0) -> np.ndarray:
    n = keys.shape[0]
    size = min(n, max(_TRAIN_MIN, _POINTS_PER_CENTROID * nlist))
    if size == n:
        return _float32(keys, normalize)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return _float32(keys[torch.from_numpy(rows)], normalize)


def set_search_params(idx, nprobe: int) -> None:
    """nprobe for IVF indexes (capped at the list count); other indexes keep faiss's defaults."""
    import faiss

    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)


def build_index(keys: torch.Tensor, factory: str = EXACT, nprobe: int = 8, normalize: bool = False):
    """A faiss L2 index over `keys` (n, d), any float dtype; trained on a sample, filled in chunks."""
    import faiss

    keys = torch.as_tensor(keys)
    n, d = keys.shape
    idx = faiss.index_factory(d, factory, faiss.METRIC_L2)
    if not idx.is_trained:
        ivf = faiss.try_extract_index_ivf(idx)
        try:
            idx.train(_train_sample(keys, ivf.nlist if ivf is not None else 1, normalize))
        except RuntimeError as e:  # faiss asserts, e.g. fewer training points than PQ centroids
            why = str(e).splitlines()[0].rpartition("failed: ")[2]
            raise KnnMoeError(f"cannot train the {factory} index on {n} keys per layer ({why}); "
                              "memories this small need index=exact") from None
        _drop_pca_training_state(idx)
    for start in range(0, n, _CHUNK):
        idx.add(_float32(keys[start : start + _CHUNK], normalize))
    set_search_params(idx, nprobe)
    return idx


def _drop_pca_training_state(idx) -> None:
    """faiss keeps PCA's full d x d eigenvector matrix after training (16 MB at d = 2048) though search only
    applies the d' x d projection; dropping it keeps saved ivfpq indexes small."""
    import faiss

    if isinstance(idx, faiss.IndexPreTransform):
        for i in range(idx.chain.size()):
            vt = faiss.downcast_VectorTransform(idx.chain.at(i))
            if isinstance(vt, faiss.PCAMatrix):
                vt.PCAMat.clear()


def search(idx, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 distances (m, k) float32 and ids (m, k) int64 of each query's k nearest keys, one batched call."""
    return idx.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def index_nn_sq_dist(idx, keys: torch.Tensor, normalize: bool, seed: int = 0) -> float | None:
    """Mean squared distance from a key to its nearest other key as the index itself measures it (for `ivfpq`,
    in the PCA space between 8-bit codes): sigma=auto for an index whose distances are not the true ones, found
    the way memory.py finds the true statistic (the same seeded sample of keys); None below two keys."""
    d2 = index_nn_sq_dists(idx, keys, normalize, seed)
    return None if d2 is None or not len(d2) else float(d2.mean())


def index_nn_sq_dists(idx, keys: torch.Tensor, normalize: bool, seed: int = 0) -> np.ndarray | None:
    """The squared distances behind `index_nn_sq_dist`, float64, one per sampled key the index found a neighbour
    for (sigma=auto takes their mean, sigma=mean_nn the mean of their roots); None below two keys."""
    n = keys.shape[0]
    if n < 2:
        return None
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, _NN_SAMPLE), replace=False))
    dist2, ids = search(idx, _float32(keys[torch.from_numpy(rows)], normalize), 2)
    # the key itself is usually first; an exact duplicate (or a code that decodes nearer) may come before it
    other = np.where(ids[:, 0] == rows, dist2[:, 1], dist2[:, 0])
    other = other[np.isfinite(other) & (ids.min(1) >= 0)]  # a probed list may hold fewer than 2 keys
    return other.astype(np.float64)


def index_bytes(idx) -> int:
    """Size of the serialized index: what it costs in memory, give or take faiss's bookkeeping."""
    import faiss

    return int(faiss.serialize_index(idx).nbytes)


def available_ram() -> int | None:
    """Bytes of RAM the kernel says can be had without swapping (Linux MemAvailable); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_exact_fits(memory: str, exact_bytes: int) -> None:
    """Refuse exact indexes whose fp16 key copies (`exact_bytes` over all layers) exceed the available RAM."""
    available = available_ram()
    if available is not None and exact_bytes > available:
        raise KnnMoeError(
            f"index=exact keeps every layer's fp16 keys in RAM ({exact_bytes / 2**30:.1f} GiB for memory {memory}) "
            f"but only {available / 2**30:.1f} GiB is available. Use index=ivfpq, ivfpq_rerank or hnsw: they train "
            "on a sample and add keys in chunks (the re-ranked ones read candidate rows from the memory-mapped keys)."
        )


# -- trained indexes saved next to the memory -------------------------------------------------------------


def index_spec(factory: str, normalize: bool, keys_sha256: str) -> dict:
    """What a saved index depends on: the keys (by their file's checksum), the factory string, normalization,
    how it was trained (the sample's seed and least size), faiss's version."""
    import faiss

    return {"format": SIDECAR_FORMAT, "factory": factory, "normalize": normalize, "keys_sha256": keys_sha256,
            "faiss_version": faiss.__version__,
            "training": {"seed": 0, "min_points": _TRAIN_MIN, "points_per_centroid": _POINTS_PER_CENTROID}}


def index_path(memory_dir: str | Path, layer: int, spec: dict) -> Path:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(memory_dir) / INDEX_DIR / f"layer_{layer:03d}.{digest}.faiss"


class RefusedIndex(Exception):
    """A saved index that is not the one its memory needs: the reason, for the warning before retraining."""


def _structure(idx) -> list:
    """The index's kind as the factory makes it: types, dimensions, lists and code sizes through its chain."""
    import faiss

    # a new name: the argument may be the only reference to an owning proxy, freeing the C++ index with it
    down = faiss.downcast_index(idx)
    out = [type(down).__name__, int(down.d)]
    if isinstance(down, faiss.IndexPreTransform):
        for i in range(down.chain.size()):
            vt = faiss.downcast_VectorTransform(down.chain.at(i))
            out += [type(vt).__name__, int(vt.d_in), int(vt.d_out)]
        return out + _structure(down.index)
    ivf = faiss.try_extract_index_ivf(down)
    if ivf is not None:
        out += [int(ivf.nlist), int(ivf.code_size)]
    return out


def check_index_matches(idx, keys: torch.Tensor, spec: dict, nprobe: int) -> None:
    """Raise RefusedIndex unless `idx` is an index of `keys` made by spec's factory (see the module docstring)."""
    import faiss

    n, d = keys.shape
    if idx.ntotal != n or idx.d != d:
        raise RefusedIndex(f"it holds {idx.ntotal} keys of dimension {idx.d}, the layer {n} of dimension {d}")
    fresh = faiss.index_factory(d, spec["factory"], faiss.METRIC_L2)
    if _structure(idx) != _structure(fresh):
        raise RefusedIndex(f"it is not a {spec['factory']} index ({_structure(idx)})")
    if not idx.is_trained:
        raise RefusedIndex("it is not trained")
    rows = np.sort(np.random.default_rng(0).choice(n, size=min(n, _SELF_SAMPLE), replace=False))
    set_search_params(idx, nprobe)
    _, ids = search(idx, _float32(keys[torch.from_numpy(rows)], spec["normalize"]), min(n, _SELF_K))
    found = float((ids == rows[:, None]).any(1).mean())
    if found < _SELF_FOUND:
        raise RefusedIndex(f"only {found:.0%} of a sample of the layer's own keys find themselves in it: it was "
                           "made from other keys")


def read_saved_index(path: Path, spec: dict, keys: torch.Tensor | None = None, nprobe: int = 8):
    """The index saved at `path` for `spec` (and, given `keys`, checked against them), or None if none was saved
    (or its save never finished). Raises RefusedIndex, naming why, for any other index."""
    import faiss

    sidecar = path.with_name(path.name + ".json")
    if not (path.exists() and sidecar.exists()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefusedIndex(f"{sidecar.name} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("spec") != spec:
        found = meta.get("spec") if isinstance(meta, dict) else meta
        raise RefusedIndex(f"{sidecar.name} describes another index ({found})")
    if sha256_file(path) != meta.get("sha256"):
        raise RefusedIndex(f"{path.name} is truncated or corrupted (its sha256 differs from {sidecar.name})")
    try:
        idx = faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as e:  # faiss's own errors on a file it cannot parse
        raise RefusedIndex(f"faiss cannot read {path.name} ({str(e).splitlines()[0][:200]})") from None
    if keys is not None:
        check_index_matches(idx, keys, spec, nprobe)
    return idx


def save_index(idx, path: Path, spec: dict) -> None:
    """Index file first, sidecar (with the file's checksum) last, both renamed into place."""
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(idx, str(tmp))
    with atomic_path(path.with_name(path.name + ".json")) as tmp:
        tmp.write_text(json.dumps({"spec": spec, "sha256": sha256_file(path), "bytes": path.stat().st_size}, indent=2))


def load_or_build(keys: torch.Tensor, factory: str, nprobe: int, normalize: bool, memory_dir: str | Path | None,
                  layer: int, keys_sha256: str | None):
    """The layer's index: read from the memory directory when saved there, else built (and saved if it trains)."""
    if factory == EXACT or memory_dir is None or keys_sha256 is None:
        return build_index(keys, factory, nprobe, normalize)
    spec = index_spec(factory, normalize, keys_sha256)
    path = index_path(memory_dir, layer, spec)
    try:
        idx = read_saved_index(path, spec, keys, nprobe)
    except RefusedIndex as why:
        log.warning("the saved index %s is not this memory's layer %d %s index and was not used: %s. "
                    "Retraining it in its place.", path, layer, factory, why)
        idx = None
    if idx is not None:
        set_search_params(idx, nprobe)
        return idx
    log.info("training %s for layer %d (%d keys); it is saved to %s for reuse", factory, layer, keys.shape[0], path)
    idx = build_index(keys, factory, nprobe, normalize)
    try:
        save_index(idx, path, spec)
    except OSError as e:  # a read-only memory still works, it just retrains next time
        log.warning("could not save the trained index to %s (%s); it will be retrained next time", path, e)
    return idx


# -- cost warning ------------------------------------------------------------------------------------------

_warned: set[str] = set()


def layer_macs_per_token(decoder_layer: torch.nn.Module, num_experts: int, top_k: int) -> int:
    """Multiply-adds per token of one decoder layer: every non-expert weight plus top_k of num_experts experts."""
    experts = sum(p.numel() for name, p in decoder_layer.named_parameters() if ".experts." in f".{name}")
    return sum(p.numel() for p in decoder_layer.parameters()) - experts + experts * top_k // max(num_experts, 1)


def warn_if_exact_dominates(memory: str, n: int, d: int, layer_macs: int) -> None:
    """Once per memory: exhaustive search costs n*d multiply-adds per token and layer; say when that exceeds the
    layer's own compute (measured at d = 2048 on 2 CPU cores: 100k keys cost 1.3x the layer)."""
    if memory in _warned or n * d <= layer_macs:
        return
    _warned.add(memory)
    log.warning(
        "memory %s holds %d keys per layer: exact search (~%.1fx the MoE layer's compute per token) will dominate "
        "the run time. Use index=ivfpq (the paper's fast variant) or index=ivfpq_rerank (ours, faster on a "
        "CPU, docs/retrieval.md).", memory, n, n * d / layer_macs,
    )


# -- re-ranking candidates by their true distance -----------------------------------------------------------


def score_dtype(key_norm: torch.Tensor) -> torch.dtype:
    """fp16 for the candidates' ranking products c.q/|q| (bounded by |c|) unless some key's norm could overflow it.

    fp16 products cost a quarter of converting each candidate to fp32 first (docs/retrieval.md) and round the
    ranking scores by ~2e-4 |c|, which only reorders near-ties; the kept neighbours' distances are then exact.
    """
    return torch.float16 if len(key_norm) == 0 or float(key_norm.max()) < 3e4 else torch.float32


def rerank(q: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor, key_norm: torch.Tensor, k: int,
           normalize: bool, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """The k candidates nearest to each query by true distance, and their squared distances in fp32.

    q:        (m, d) fp32 queries (unit vectors when `normalize`)
    ids:      (m, r) int64 candidate rows of `keys`, -1 where the index found fewer than r
    keys:     (n, d) fp16 keys as stored (raw: `normalize` divides them by key_norm here)
    key_norm: (n,) fp32 |key|
    returns   dist2 (m, k) fp32 ascending (inf for missing candidates), ids (m, k)

    Ranking: ||q - c||^2 = |c|^2 - 2 c.q + |q|^2, so candidates order as s = |c|^2 / (2|q|) - c.q/|q|, whose
    product term is one (m, r, d) x (m, d) batched product in `dtype` on the stored keys (no fp32 copy of the
    candidates). The k kept are then measured exactly as ||q - c||^2 in fp32 (a difference, no cancellation).
    """
    found = ids >= 0
    ids = ids.clamp_min(0)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (m, 1)
    cand = keys.index_select(0, ids.reshape(-1)).view(*ids.shape, -1)  # (m, r, d) fp16
    dot = torch.bmm(cand.to(dtype), (q / q_norm).to(dtype).unsqueeze(-1)).squeeze(-1).float()  # (m, r) c.q/|q|
    norm = key_norm[ids]  # (m, r)
    if normalize:
        score = 1.0 / (2 * q_norm) - dot / norm.clamp_min(1e-12)
    else:
        score = norm.pow(2) / (2 * q_norm) - dot
    order = score.masked_fill(~found, float("inf")).topk(k, dim=-1, largest=False).indices  # (m, k)
    kept = cand[torch.arange(len(cand), device=cand.device).unsqueeze(1), order].float()  # (m, k, d)
    if normalize:
        kept = kept / norm.gather(1, order).clamp_min(1e-12).unsqueeze(-1)
    dist2 = (kept - q.unsqueeze(1)).pow(2).sum(-1)  # (m, k)
    dist2 = dist2.masked_fill(~found.gather(1, order), float("inf"))
    dist2, again = dist2.sort(dim=-1)  # the fp16 ranking may have swapped near-ties
    return dist2, ids.gather(1, order).gather(1, again)


def key_norms(keys: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """|key| (n,) fp32, computed in chunks (the keys may be memory-mapped), on `device`."""
    if len(keys) == 0:
        return torch.zeros(0, device=device)
    return torch.cat([c.to(device).float().norm(dim=-1) for c in keys.split(_CHUNK)])


# -- GPU residency -----------------------------------------------------------------------------------------


class TorchExactIndex:
    """Exact search on a CUDA device in torch, without faiss: fp16 keys on the device, fp16 ranking products per
    chunk of keys for RERANK x k candidates, then their exact fp32 distances (`rerank`). The keys are as large as
    faiss-gpu's fp16 flat index (2 bytes per dimension and key)."""

    chunk = 262_144  # keys scored at once: a (queries, chunk) fp16 block

    def __init__(self, keys: torch.Tensor, device: torch.device, normalize: bool):
        self.keys = keys.to(device)  # (n, d) fp16
        self.key_norm = key_norms(self.keys)  # (n,)
        self.normalize = normalize
        self.dtype = score_dtype(self.key_norm)
        self.device = device

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries.float()
        if self.normalize:
            q = F.normalize(q, dim=-1, eps=1e-12)
        q_norm = q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        q_hat = (q / q_norm).to(self.dtype)
        r = min(k * RERANK, self.keys.shape[0])
        best_s, best_i = [], []
        for start in range(0, self.keys.shape[0], self.chunk):
            c = self.keys[start : start + self.chunk]
            norm = self.key_norm[start : start + self.chunk]
            dot = (q_hat @ c.to(self.dtype).T).float()  # (m, chunk)
            if self.normalize:
                s = 1.0 / (2 * q_norm) - dot / norm.clamp_min(1e-12)
            else:
                s = norm.pow(2) / (2 * q_norm) - dot
            s, i = s.topk(min(r, s.shape[1]), dim=-1, largest=False)
            best_s.append(s)
            best_i.append(i + start)
        order = torch.cat(best_s, 1).topk(r, dim=-1, largest=False).indices
        ids = torch.cat(best_i, 1).gather(1, order)  # (m, r) candidates
        return rerank(q, ids, self.keys, self.key_norm, k, self.normalize, self.dtype)


class GpuIndex:
    """A faiss index on one CUDA device, searched with torch tensors that never leave that device.

    faiss-gpu runs a PCA pre-transform on the host, so the PCA is applied here in torch and only the inner
    index is cloned to the GPU.
    """

    def __init__(self, idx, device: torch.device):
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss-gpu search torch CUDA tensors in place)

        self.pca = None
        if isinstance(idx, faiss.IndexPreTransform):
            if idx.chain.size() != 1:
                raise KnnMoeError(f"GPU search supports at most one PCA pre-transform, not {idx.chain.size()}")
            vt = faiss.downcast_VectorTransform(idx.chain.at(0))
            a = faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)
            b = faiss.vector_to_array(vt.b)
            self.pca = (torch.from_numpy(a).to(device), torch.from_numpy(b).to(device))
            idx = idx.index
        self.resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = True
        self.index = faiss.index_cpu_to_gpu(self.resources, device.index or 0, idx, options)
        self.device = device

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries.float().contiguous()
        if self.pca is not None:
            a, b = self.pca
            q = (q @ a.T + b).contiguous()  # faiss PCAMatrix.apply: A x + b
        return self.index.search(q, k)


def gpu_available() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_device(idx, device: torch.device):
    """`idx` on `device` when that is a CUDA device faiss-gpu can use (a GpuIndex), else the CPU index itself."""
    if device.type != "cuda":
        return idx
    if not gpu_available():
        if "gpu" not in _warned:
            _warned.add("gpu")
            log.warning("the model runs on CUDA but faiss-gpu is not installed: approximate kNN search stays on "
                        "the CPU (pip install 'knnmoe-eval[gpu]'; index=exact searches on the GPU without it)")
        return idx
    try:
        return GpuIndex(idx, device)
    except RuntimeError as e:  # faiss-gpu lacks some index types (HNSW, flat scalar quantizers)
        log.warning("this index cannot live on the GPU (%s); searching it on the CPU", str(e).splitlines()[0])
        return idx
