"""The memory: on-disk format, writing and validated loading.

A memory is a directory:

    manifest.json             written last: its presence means the memory is complete
    layer_003.safetensors     per MoE layer: "keys" (n, d) fp16 router inputs, "values" (n, E) fp32 logits z*

The manifest describes everything a reader needs (shapes and dtypes, the model it was built for down to a
fingerprint of every router's weights, build settings, sigma statistics, a sha256 per file), so readers never
infer anything from file names and a memory from another model, a truncated file or a half-finished build is
refused before the first forward. Only safetensors and JSON are read: loading a memory cannot run code.

Memories may be larger than RAM. Layer files are written by streaming row chunks after a precomputed header
(`write_memory_streamed`; the bytes are those `safetensors.save_file` would write), and `load_memory` returns
memory-mapped tensors (safetensors maps the file; pages are read when touched), so one layer's keys never need to
be resident at once: the checks, the sigma statistics, index training (on a sample) and filling (in chunks) all
walk the keys chunk by chunk.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import KnnMoeError
from .families import RouterSite

FORMAT = "knnmoe-memory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SIGMA_SAMPLE = 2048  # queries used to estimate the mean nearest-neighbour distance
ROWS = 16_384  # rows per chunk when walking a layer: 64 MB of fp16 keys at d = 2048
_NN_ROWS = 4096  # keys per chunk of the nearest-neighbour statistics: 32 MB as float32 at d = 2048


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_tensors_atomic(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Write a safetensors file under a temporary name and rename it: a reader never sees half a file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return sha256_file(path)


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def router_fingerprint(site: RouterSite) -> str:
    """sha256 of the router weights rounded to bf16: equal for a bf16 checkpoint loaded in bf16, fp16 or fp32."""
    h = hashlib.sha256()
    for p in (site.module.weight, getattr(site.module, "bias", None)):
        if p is not None:
            h.update(p.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


def model_signature(model: torch.nn.Module, sites: Sequence[RouterSite]) -> dict:
    """What a memory records about its model, and what loading checks it against."""
    cfg = model.config
    return {
        "name_or_path": getattr(cfg, "_name_or_path", ""),
        "model_type": sites[0].family.name,
        "hidden_size": sites[0].hidden_size,
        "num_experts": sites[0].num_experts,
        "top_k": int(sites[0].module.top_k),
        "moe_layers": [s.layer for s in sites],
        "router_fingerprints": {str(s.layer): router_fingerprint(s) for s in sites},
    }


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_nn_sq_dists(keys: torch.Tensor, seed: int = 0) -> tuple[float | None, float | None]:
    """Mean squared distance from a key to its nearest other key, raw and between L2-normalised keys (sampled
    queries, exact search); None below two keys.

    One pass over the keys in chunks: both distances come from the same dot products,
    ||q - x||^2 = |q|^2 + |x|^2 - 2 q.x and ||q/|q| - x/|x|||^2 = 2 - 2 q.x / (|q| |x|).
    """
    n = keys.shape[0]
    if n < 2:
        return None, None
    rows = torch.from_numpy(np.random.default_rng(seed).choice(n, size=min(n, _SIGMA_SAMPLE), replace=False))
    q = keys[rows].float()  # (s, d)
    q_sq = q.pow(2).sum(-1, keepdim=True)  # (s, 1)
    q_norm = q_sq.sqrt().clamp_min(1e-12)
    best = {"raw": [], "l2": []}  # per chunk: (s, 2) two smallest distances, (s, 2) their ids
    for start in range(0, n, _NN_ROWS):
        x = keys[start : start + _NN_ROWS].float()  # (c, d)
        x_sq = x.pow(2).sum(-1)  # (c,)
        dots = q @ x.T  # (s, c)
        raw = (q_sq + x_sq - 2 * dots).clamp_min(0)
        l2 = (2 - 2 * dots / (q_norm * x_sq.sqrt().clamp_min(1e-12))).clamp_min(0)
        for name, dist in (("raw", raw), ("l2", l2)):
            d2, ids = dist.topk(min(2, dist.shape[1]), dim=1, largest=False)
            best[name].append((d2, ids + start))
    out = []
    for name in ("raw", "l2"):
        d2, ids = torch.cat([d for d, _ in best[name]], 1), torch.cat([i for _, i in best[name]], 1)
        d2, order = d2.topk(2, dim=1, largest=False)
        ids = ids.gather(1, order)
        # the query itself is among the keys; an exact duplicate may come before it
        other = torch.where(ids[:, 0] == rows, d2[:, 1], d2[:, 0])
        out.append(float(other.double().mean()))
    return out[0], out[1]


def layer_stats(keys_fp16: torch.Tensor) -> dict:
    raw, l2 = mean_nn_sq_dists(keys_fp16)
    return {"mean_nn_sq_dist": raw, "mean_nn_sq_dist_l2": l2}


def all_finite(x: torch.Tensor) -> bool:
    """isfinite over row chunks: a whole-tensor check would allocate a bool copy as large as a quarter of it."""
    return all(bool(torch.isfinite(c).all()) for c in x.split(ROWS)) if len(x) else True


@dataclass(frozen=True)
class LayerMemory:
    keys: torch.Tensor  # (n, d) fp16
    values: torch.Tensor  # (n, E) fp32
    stats: dict  # mean_nn_sq_dist[_l2]: the basis of sigma=auto

    def __len__(self) -> int:
        return self.keys.shape[0]


@dataclass(frozen=True)
class Memory:
    path: Path
    manifest: dict
    layers: dict[int, LayerMemory]

    @property
    def signature(self) -> dict:
        return self.manifest["model"]

    def check_matches(self, signature: dict) -> None:
        """Raise, naming the mismatch, unless this memory was built for the model described by `signature`."""
        mine = self.signature
        where = f"memory {self.path} was built for {mine.get('name_or_path')!r} ({mine.get('model_type')})"
        for field in ("model_type", "hidden_size", "num_experts", "top_k", "moe_layers"):
            if mine[field] != signature[field]:
                raise KnnMoeError(
                    f"{where} and does not fit this model: {field} is {mine[field]} in the memory but "
                    f"{signature[field]} in the model. Build a memory for this model (mode=build)."
                )
        changed = [l for l, fp in mine["router_fingerprints"].items() if signature["router_fingerprints"][l] != fp]
        if changed:
            raise KnnMoeError(
                f"{where}: the router weights of layers {changed} differ from this model's "
                f"({signature.get('name_or_path')!r}), so its stored logits do not apply. Build a memory for this model."
            )


LayerRows = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (keys (m, d), values (m, E)) chunks, in memory order


def _header(n: int, d: int, n_exp: int) -> bytes:
    """The safetensors header `save_file({"keys", "values"})` writes: tensors ordered by dtype size (fp32 values
    first, then fp16 keys), compact JSON, space-padded to 8 bytes. Computing it up front lets the rows stream in."""
    values_end = n * n_exp * 4
    header = {"values": {"dtype": "F32", "shape": [n, n_exp], "data_offsets": [0, values_end]},
              "keys": {"dtype": "F16", "shape": [n, d], "data_offsets": [values_end, values_end + n * d * 2]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _checked_chunk(layer: int, keys: torch.Tensor, values: torch.Tensor, d: int, n_exp: int):
    if keys.ndim != 2 or keys.shape[1] != d or values.shape != (keys.shape[0], n_exp):
        raise KnnMoeError(
            f"layer {layer}: keys must be (n, {d}) and values (n, {n_exp}); got {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    if not (all_finite(keys) and all_finite(values)):
        raise KnnMoeError(f"layer {layer}: keys or values contain NaN or inf; the memory was not written")
    k16 = keys.detach().to("cpu", torch.float16).contiguous()
    if not all_finite(k16):
        raise KnnMoeError(f"layer {layer}: keys overflow fp16 (|x| > 65504); the memory was not written")
    return k16, values.detach().to("cpu", torch.float32).contiguous()


def write_layer_file(path: Path, layer: int, n: int, d: int, n_exp: int, rows: LayerRows) -> str:
    """Stream `n` rows of one layer into a safetensors file (temporary name, renamed when complete); its sha256.

    Keys and values go through two handles on one file, each writing its region sequentially, so chunks of any
    size stream through without ever holding the layer."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    header = _header(n, d, n_exp)
    written = 0
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.truncate(len(header) + n * n_exp * 4 + n * d * 2)
        with open(tmp, "r+b", buffering=1 << 22) as fv, open(tmp, "r+b", buffering=1 << 22) as fk:
            fv.seek(len(header))
            fk.seek(len(header) + n * n_exp * 4)
            for keys, values in rows:
                k16, v32 = _checked_chunk(layer, keys, values, d, n_exp)
                if written + len(k16) > n:
                    raise KnnMoeError(f"layer {layer}: more rows than the {n} announced; the memory was not written")
                fk.write(k16.numpy().data)
                fv.write(v32.numpy().data)
                written += len(k16)
        if written != n:
            raise KnnMoeError(f"layer {layer}: {written} rows written but {n} announced; the memory was not written")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha256_file(path)


def write_memory_streamed(
    out_dir: str | Path,
    rows: Mapping[int, tuple[int, LayerRows]],
    signature: dict,
    build: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete memory layer by layer from row chunks: rows[layer] = (n, iterable of (keys, values)).

    Iterables are consumed one layer at a time (pass generators to read each layer's rows only when it is
    written). The sigma statistics are then computed from the written, memory-mapped file.
    """
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise KnnMoeError(f"{out} already holds a memory; choose another directory or pass overwrite=True")
    layers = signature["moe_layers"]
    if sorted(rows) != sorted(layers):
        raise KnnMoeError(f"a memory needs keys and values for every MoE layer {layers}; got {sorted(rows)}")
    d, n_exp = signature["hidden_size"], signature["num_experts"]
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here until the end the directory reads as incomplete
    entries = {}
    for layer in layers:
        n, chunks = rows[layer]
        name = f"layer_{layer:03d}.safetensors"
        digest = write_layer_file(out / name, layer, n, d, n_exp, chunks)
        entries[str(layer)] = {
            "file": name,
            "num_keys": int(n),
            "keys_dtype": "float16",
            "values_dtype": "float32",
            "sha256": digest,
            **layer_stats(load_file(str(out / name))["keys"]),
        }
    from . import __version__

    write_json_atomic(
        out / MANIFEST,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "knnmoe_eval_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": signature,
            "build": build or {},
            "layers": entries,
        },
    )
    return out


def write_memory(
    out_dir: str | Path,
    keys: Mapping[int, torch.Tensor],
    values: Mapping[int, torch.Tensor],
    signature: dict,
    build: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete memory from per-layer tensors: keys (n, d), values (n, E), for every MoE layer."""
    layers = signature["moe_layers"]
    if sorted(keys) != sorted(layers) or sorted(values) != sorted(layers):
        raise KnnMoeError(f"a memory needs keys and values for every MoE layer {layers}; got {sorted(keys)}")
    d, n_exp = signature["hidden_size"], signature["num_experts"]
    for layer in layers:  # all layers checked before any file is touched
        _checked_chunk(layer, keys[layer], values[layer], d, n_exp)

    def chunks(layer: int) -> LayerRows:
        for start in range(0, keys[layer].shape[0], ROWS):
            yield keys[layer][start : start + ROWS], values[layer][start : start + ROWS]

    return write_memory_streamed(out_dir, {l: (int(keys[l].shape[0]), chunks(l)) for l in layers}, signature,
                                 build, overwrite)


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete memory directory, without touching its layer files: a cheap first check for
    callers that load the memory itself elsewhere (vLLM's workers)."""
    out = Path(path)
    if not out.is_dir():
        raise KnnMoeError(
            f"memory directory {out} does not exist. Build one with "
            f"`lm_eval --model hf-knnmoe --model_args pretrained=...,mode=build,memory={out} --tasks <build task>`."
        )
    if not (out / MANIFEST).exists():
        raise KnnMoeError(
            f"{out} has no {MANIFEST}: the memory is incomplete (a build that did not finish). "
            "Rerun the same build command to resume it."
        )
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise KnnMoeError(f"{out / MANIFEST} is not valid JSON ({e}); the memory is corrupted, rebuild it") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise KnnMoeError(
            f"{out} is not a {FORMAT} v{FORMAT_VERSION} memory (found {manifest.get('format')!r} "
            f"v{manifest.get('format_version')!r}); rebuild it with this version of knnmoe-eval"
        )
    return manifest


def load_memory(path: str | Path, verify: bool = True) -> Memory:
    """Read and validate a memory directory; `verify` checks every file's sha256 against the manifest.

    Keys and values are memory-mapped (safetensors maps the file): nothing is resident until it is read.
    """
    out = Path(path)
    manifest = read_manifest(out)
    d, n_exp = manifest["model"]["hidden_size"], manifest["model"]["num_experts"]
    layers = {}
    for layer, entry in manifest["layers"].items():
        file = out / entry["file"]
        if not file.exists():
            raise KnnMoeError(f"{file} is missing from memory {out}; rebuild the memory")
        if verify and sha256_file(file) != entry["sha256"]:
            raise KnnMoeError(
                f"{file} is truncated or corrupted (sha256 differs from the manifest); rebuild the memory"
            )
        try:
            tensors = load_file(str(file))
        except Exception as e:  # safetensors raises its own types for malformed headers
            raise KnnMoeError(f"{file} is not a readable safetensors file ({e}); rebuild the memory") from e
        keys, values = tensors.get("keys"), tensors.get("values")
        n = entry["num_keys"]
        if keys is None or values is None or keys.shape != (n, d) or values.shape != (n, n_exp):
            raise KnnMoeError(f"{file} does not hold keys ({n}, {d}) and values ({n}, {n_exp}) as its manifest says")
        if keys.dtype != torch.float16 or values.dtype != torch.float32:
            raise KnnMoeError(f"{file}: keys must be float16 and values float32, found {keys.dtype}, {values.dtype}")
        if not (all_finite(keys) and all_finite(values)):
            raise KnnMoeError(f"{file} contains NaN or inf in its keys or values; rebuild the memory")
        layers[int(layer)] = LayerMemory(keys, values, {k: entry[k] for k in ("mean_nn_sq_dist", "mean_nn_sq_dist_l2")})
    if sorted(layers) != sorted(manifest["model"]["moe_layers"]):
        raise KnnMoeError(f"{out}: manifest lists layers {sorted(layers)} but the model has {manifest['model']['moe_layers']}")
    return Memory(out, manifest, layers)

