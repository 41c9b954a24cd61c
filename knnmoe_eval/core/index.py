"""Nearest-neighbour search over one layer's keys, with faiss.

Indexes are named by faiss factory strings and search parameters by faiss parameter strings, so a memory's
index is described by two short strings. Three names stand for the choices worth knowing:

    exact   "SQfp16": keys stored fp16, searched exhaustively (exact L2 on the fp16 keys); the paper's default
    ivfpq   "PCA{d/8},IVF{nlist},PQ{m}x{bits}np": the paper's fast variant (PCA to d/8, 8-bit PQ codes, IVF
            searched with nprobe lists); nlist grows as ~4 sqrt(N). The "np" suffix skips faiss's polysemous
            training, which took minutes per layer at d = 2048 and buys nothing for k-NN search
    hnsw    "PCA{d/8},HNSW32": a graph over PCA-reduced float32 keys (1 KB per key at d = 2048); on the full
            fp16 keys ("HNSW32,SQfp16") each distance costs 8x more and search took ~10% of a layer at 10k keys

Anything else is passed to `faiss.index_factory` as is. Approximate indexes return RERANK x k candidates that
retrieval re-ranks by their true distance on the fp16 keys, so similarities and sigma=auto keep their meaning.

Indexes that need training are saved next to the memory as `index/layer_XXX.<spec hash>.faiss` with a JSON
sidecar holding the file's sha256, written last; the checksum is verified before faiss reads the file, and a
mismatch is refused. A faiss index file is plain data (faiss has no code-carrying serialization), so loading one
cannot run code.

Training runs on a seeded sample and keys are converted and added in chunks, so a layer never needs a float32
copy of all its keys; with the memory's memory-mapped keys, an approximate index is built without the layer's
keys ever being resident. Exact search is the exception by nature: its index is a copy of every key, so a memory
whose exact indexes would not fit in the available RAM is refused at setup. GPU residency (faiss-gpu) is
optional and imported only when a layer lives on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import KnnMoeError
from .files import atomic_path, sha256_file

log = logging.getLogger(__name__)

EXACT = "SQfp16"
INDEX_DIR = "index"
SIDECAR_FORMAT = 1
_CHUNK = 65_536  # keys converted to float32 and added per call
_TRAIN_MIN = 32_768  # PCA and PQ want many more points than the IVF centroids alone
_POINTS_PER_CENTROID = 39  # below this faiss's k-means warns that it has too few points
# approximate indexes return this many times k candidates, re-ranked by their true distance to the query: PQ
# codes alone place the true nearest key first only ~1/3 of the time at d = 2048 (see docs/retrieval.md)
RERANK = 8


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _pow2(x: float, rounding=math.floor) -> int:
    return 1 << max(0, int(rounding(math.log2(max(x, 1.0)))))


def ivfpq_factory(d: int, n: int) -> str:
    """The paper's IVFPQ for `n` keys of dimension `d`: PCA to d/8, IVF with ~4 sqrt(n) lists, 8-bit PQ codes.

    Small memories cannot train 256 centroids per sub-quantizer (or many lists) with enough points, so the list
    count and the code bits shrink to keep >= 39 training points per centroid; at d = 2048 and N >= 10k the
    result is PCA256,IVF{nlist},PQ32x8np (32 bytes of codes per key).
    """
    d_pca = max(1, d // 8)
    m = max(s for s in range(1, min(32, d_pca) + 1) if d_pca % s == 0)  # sub-quantizers: <= 32 bytes per key
    nlist = min(_pow2(4 * math.sqrt(n), round), _pow2(n / _POINTS_PER_CENTROID))
    bits = min(8, max(4, int(math.floor(math.log2(max(n / _POINTS_PER_CENTROID, 1.0))))))
    return f"PCA{d_pca},IVF{nlist},PQ{m}x{bits}np"


def factory_string(index: str, d: int, n: int) -> str:
    """The faiss factory string that `index` (a name above or a factory string) means for n keys of dimension d."""
    if index == "exact":
        return EXACT
    if index == "ivfpq":
        return ivfpq_factory(d, n)
    if index == "hnsw":
        return f"PCA{max(1, d // 8)},HNSW32"
    import faiss

    try:  # parsed now, at setup, so that a typo is not a raw faiss error (or a failure mid-evaluation)
        faiss.index_factory(d, index, faiss.METRIC_L2)
    except RuntimeError as e:
        why = str(e).splitlines()[0].rpartition(": ")[2]  # faiss prefixes its C++ location
        raise KnnMoeError(
            f"model_arg index={index!r} is neither exact, ivfpq, hnsw nor a faiss factory string for keys of "
            f"dimension {d} ({why}); choose exact, ivfpq, hnsw or e.g. index=IVF64,Flat"
        ) from None
    return index


def is_exact(factory: str) -> bool:
    return factory == EXACT


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
            f"but only {available / 2**30:.1f} GiB is available. Use index=ivfpq or index=hnsw: they train on a "
            "sample, add keys in chunks and read the re-ranked rows from the memory-mapped keys."
        )


# -- trained indexes saved next to the memory -------------------------------------------------------------


def index_spec(factory: str, normalize: bool, keys_sha256: str) -> dict:
    """What a saved index depends on: the keys (by their file's checksum), the factory string, normalization."""
    import faiss

    return {"format": SIDECAR_FORMAT, "factory": factory, "normalize": normalize, "keys_sha256": keys_sha256,
            "faiss_version": faiss.__version__}


def index_path(memory_dir: str | Path, layer: int, spec: dict) -> Path:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(memory_dir) / INDEX_DIR / f"layer_{layer:03d}.{digest}.faiss"


def read_saved_index(path: Path, spec: dict):
    """The index saved at `path` for `spec`, or None if none was saved (or its save never finished)."""
    import faiss

    sidecar = path.with_name(path.name + ".json")
    if not (path.exists() and sidecar.exists()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise KnnMoeError(f"{sidecar} is not valid JSON ({e}); delete it and {path} to rebuild the index") from e
    if meta.get("spec") != spec:
        raise KnnMoeError(f"{sidecar} describes another index ({meta.get('spec')}); delete it and {path} to rebuild")
    if sha256_file(path) != meta.get("sha256"):
        raise KnnMoeError(
            f"{path} is truncated or corrupted (sha256 differs from {sidecar.name}); it was not loaded. "
            "Delete it and its sidecar to rebuild the index."
        )
    return faiss.read_index(str(path))


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
    if is_exact(factory) or memory_dir is None or keys_sha256 is None:
        return build_index(keys, factory, nprobe, normalize)
    spec = index_spec(factory, normalize, keys_sha256)
    path = index_path(memory_dir, layer, spec)
    idx = read_saved_index(path, spec)
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
        "the run time. Use index=ivfpq (the paper's fast variant; nprobe=8 is usually as accurate as 32) or "
        "index=hnsw.", memory, n, n * d / layer_macs,
    )


# -- GPU residency -----------------------------------------------------------------------------------------


class GpuIndex:
    """A faiss index on one CUDA device, searched with torch tensors that never leave that device.

    faiss-gpu runs a PCA pre-transform on the host, so the PCA is applied here in torch and only the inner
    index is cloned to the GPU. faiss-gpu has no flat scalar-quantizer index, so `exact` becomes a GPU flat
    index storing the same fp16 keys (exact search, GPU arithmetic).
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
        if isinstance(idx, faiss.IndexScalarQuantizer):
            flat = faiss.IndexFlatL2(idx.d)
            for start in range(0, idx.ntotal, _CHUNK):
                flat.add(idx.reconstruct_n(start, min(_CHUNK, idx.ntotal - start)))
            idx = flat
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
            log.warning("the model runs on CUDA but faiss-gpu is not installed: kNN search stays on the CPU "
                        "(pip install 'knnmoe-eval[gpu]')")
        return idx
    try:
        return GpuIndex(idx, device)
    except RuntimeError as e:  # faiss-gpu lacks some index types (HNSW)
        log.warning("this index cannot live on the GPU (%s); searching it on the CPU", str(e).splitlines()[0])
        return idx
