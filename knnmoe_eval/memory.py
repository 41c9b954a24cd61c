"""The memory: on-disk format, writing and validated loading.

A memory is a directory:

    manifest.json             written last: its presence means the memory is complete
    layer_003.safetensors     per MoE layer: "keys" (n, d) fp16 router inputs, "values" (n, E) fp32 logits z*

The manifest describes everything a reader needs (shapes and dtypes, the model it was built for down to a
fingerprint of every router's weights, build settings, sigma statistics, a sha256 per file), so readers never
infer anything from file names and a memory from another model, a truncated file or a half-finished build is
refused before the first forward. Only safetensors and JSON are read: loading a memory cannot run code.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import KnnMoeError
from .families import RouterSite

FORMAT = "knnmoe-memory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SIGMA_SAMPLE = 2048  # queries used to estimate the mean nearest-neighbour distance


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


def mean_nn_sq_dist(keys: np.ndarray, seed: int = 0) -> float | None:
    """Mean squared distance from a key to its nearest other key (sampled queries); None below two keys."""
    import faiss

    n = keys.shape[0]
    if n < 2:
        return None
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys)
    rows = np.random.default_rng(seed).choice(n, size=min(n, _SIGMA_SAMPLE), replace=False)
    dist, ids = index.search(keys[rows], 2)
    other = np.where(ids[:, 0] == rows, dist[:, 1], dist[:, 0])  # an exact duplicate may come before self
    return float(other.mean())


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def layer_stats(keys_fp16: torch.Tensor) -> dict:
    keys = keys_fp16.float().numpy()
    return {"mean_nn_sq_dist": mean_nn_sq_dist(keys), "mean_nn_sq_dist_l2": mean_nn_sq_dist(l2_normalize(keys))}


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


def write_memory(
    out_dir: str | Path,
    keys: Mapping[int, torch.Tensor],
    values: Mapping[int, torch.Tensor],
    signature: dict,
    build: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete memory from per-layer tensors: keys (n, d), values (n, E), for every MoE layer."""
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise KnnMoeError(f"{out} already holds a memory; choose another directory or pass overwrite=True")
    layers = signature["moe_layers"]
    if sorted(keys) != sorted(layers) or sorted(values) != sorted(layers):
        raise KnnMoeError(f"a memory needs keys and values for every MoE layer {layers}; got {sorted(keys)}")
    d, n_exp = signature["hidden_size"], signature["num_experts"]
    for layer in layers:
        k, v = keys[layer], values[layer]
        if k.ndim != 2 or k.shape[1] != d or v.shape != (k.shape[0], n_exp):
            raise KnnMoeError(
                f"layer {layer}: keys must be (n, {d}) and values (n, {n_exp}); got {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise KnnMoeError(f"layer {layer}: keys or values contain NaN or inf; nothing was written")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here until the end the directory reads as incomplete
    entries = {}
    for layer in layers:
        k16 = keys[layer].detach().to("cpu", torch.float16)
        if not torch.isfinite(k16).all():
            raise KnnMoeError(f"layer {layer}: keys overflow fp16 (|x| > 65504); nothing usable was written")
        name = f"layer_{layer:03d}.safetensors"
        digest = save_tensors_atomic(
            out / name, {"keys": k16, "values": values[layer].detach().to("cpu", torch.float32)}
        )
        entries[str(layer)] = {
            "file": name,
            "num_keys": int(k16.shape[0]),
            "keys_dtype": "float16",
            "values_dtype": "float32",
            "sha256": digest,
            **layer_stats(k16),
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


def load_memory(path: str | Path, verify: bool = True) -> Memory:
    """Read and validate a memory directory; `verify` checks every file's sha256 against the manifest."""
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
        if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
            raise KnnMoeError(f"{file} contains NaN or inf in its keys or values; rebuild the memory")
        layers[int(layer)] = LayerMemory(keys, values, {k: entry[k] for k in ("mean_nn_sq_dist", "mean_nn_sq_dist_l2")})
    if sorted(layers) != sorted(manifest["model"]["moe_layers"]):
        raise KnnMoeError(f"{out}: manifest lists layers {sorted(layers)} but the model has {manifest['model']['moe_layers']}")
    return Memory(out, manifest, layers)

