"""The memory: on-disk format, writing and validated loading.

A memory is a directory:

    manifest.json             written last: its presence means the memory is complete
    layer_003.safetensors     per MoE layer: "keys" (n, d) fp16 router inputs, "values" (n, E) fp32 logits z*
    README.md                 the card (`card.py`): for people and Hub pages, derived from the manifest, never read

The manifest describes everything a reader needs (shapes and dtypes, the model it was built for down to a
fingerprint of every router's weights, build settings, sigma statistics, a sha256 per file), so readers never
infer anything from file names and a memory from another model, a truncated file or a half-finished build is
refused before the first forward. The manifest carries its own sha256 (`manifest_sha256`, over its canonical JSON)
and is checked against a schema (`check_manifest`: every field, its type), so an edited or damaged manifest is
refused with the field's name instead of failing later or silently changing the outputs. Only safetensors and
JSON are read: loading a memory cannot run code.

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
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file

from ..errors import KnnMoeError
from .card import write_card
from .files import atomic_path, sha256_file, write_json_atomic
from .sigma import RadiusSpec, layer_stats
from .signature import same_weights

log = logging.getLogger(__name__)

FORMAT = "knnmoe-memory"
FORMAT_VERSION = 2  # 2: the manifest carries its own checksum and is validated against its schema
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest_sha256"  # the manifest's checksum, stored inside it (see manifest_digest)
ROWS = 16_384  # rows per chunk when walking a layer: 64 MB of fp16 keys at d = 2048


def all_finite(x: torch.Tensor) -> bool:
    """isfinite over row chunks: a whole-tensor check would allocate a bool copy as large as a quarter of it."""
    return all(bool(torch.isfinite(c).all()) for c in x.split(ROWS)) if len(x) else True


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, compact), its own checksum field left out.

    Stored in the manifest itself: the layer files are checksummed by it, and this protects what the checksums
    cannot, the manifest's own fields (a σ statistic edited by hand or by a bit flip would change every output).
    """
    body = {k: v for k, v in manifest.items() if k != MANIFEST_SHA256}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_SHA256 = re.compile(r"[0-9a-f]{64}")
# kind -> (test, what the value must be); a manifest field is one of these kinds
_KINDS = {
    "text": (lambda v: isinstance(v, str), "a string"),
    "positive": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "count": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "sha256": (lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v)), "a sha256 hex digest"),
    "layers": (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(x) and x >= 0 for x in v)
               and len(set(v)) == len(v), "a non-empty list of distinct layer indices"),
    "file": (lambda v: isinstance(v, str) and v.endswith(".safetensors") and Path(v).name == v,
             "a .safetensors file name inside the memory directory"),
    "float16": (lambda v: v == "float16", '"float16"'),
    "float32": (lambda v: v == "float32", '"float32"'),
    # a statistic is always written as a float: an integer there is a hand edit that would move the kernel
    "distance": (lambda v: v is None or (type(v) is float and math.isfinite(v) and v >= 0),
                 "a float >= 0 (as the build writes it), or null"),
}
_SCHEMA = {
    "format": "text",
    "format_version": "positive",
    "knnmoe_eval_version": "text",
    "created": "text",
    "build": "object",  # how the memory was built: recorded for people, never read when loading
    MANIFEST_SHA256: "sha256",
    "model": {
        "name_or_path": "text",
        "model_type": "text",
        "hidden_size": "positive",
        "num_experts": "positive",
        "top_k": "positive",
        "moe_layers": "layers",
        "router_fingerprints": "object",  # one sha256 per MoE layer, checked below
    },
    "layers": "object",  # one entry per MoE layer, each of _LAYER_SCHEMA, checked below
}
_LAYER_SCHEMA = {
    "file": "file",
    "num_keys": "count",
    "keys_dtype": "float16",
    "values_dtype": "float32",
    "sha256": "sha256",
    "mean_nn_sq_dist": "distance",  # the basis of sigma=auto (rbf)
    "mean_nn_sq_dist_l2": "distance",  # the same on L2-normalised keys (rbf_l2)
}


def check_manifest(manifest, where: str) -> None:
    """Raise, naming the field and what it must be, unless `manifest` has every field of the schema, typed."""

    def bad(field: str, why: str):
        raise KnnMoeError(f"{where}: manifest field {field} {why}. The manifest is corrupted or was not written by "
                          "this version of knnmoe-eval: rebuild the memory.")

    def walk(obj, schema: dict, prefix: str):
        if not isinstance(obj, dict):
            bad(prefix.rstrip(".") or "(top level)", "must be a JSON object")
        for name, kind in schema.items():
            if name not in obj:
                bad(prefix + name, "is missing")
            if isinstance(kind, dict):
                walk(obj[name], kind, f"{prefix}{name}.")
            elif not _KINDS[kind][0](obj[name]):
                bad(prefix + name, f"is {obj[name]!r} but must be {_KINDS[kind][1]}")

    walk(manifest, _SCHEMA, "")
    model = manifest["model"]
    if model["top_k"] > model["num_experts"]:
        bad("model.top_k", f"is {model['top_k']} but must be <= model.num_experts ({model['num_experts']})")
    ids = sorted(str(layer) for layer in model["moe_layers"])
    # a dropped fingerprint would silently skip that layer's check against the model
    for name, found in (("model.router_fingerprints", model["router_fingerprints"]), ("layers", manifest["layers"])):
        if sorted(found) != ids:
            bad(name, f"has entries for layers {sorted(found)} but must have one for each of model.moe_layers {ids}")
    for layer in ids:
        if not _KINDS["sha256"][0](model["router_fingerprints"][layer]):
            bad(f"model.router_fingerprints.{layer}", "must be a sha256 hex digest")
        walk(manifest["layers"][layer], _LAYER_SCHEMA, f"layers.{layer}.")
    projections = model.get("router_projections")  # optional: memories from before it was recorded
    if projections is not None:
        if not isinstance(projections, dict) or sorted(projections) != ids:
            bad("model.router_projections", f"must have an entry for each of model.moe_layers {ids}")
        for layer, p in projections.items():
            if not (isinstance(p, list) and p and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       and math.isfinite(x) for x in p)):
                bad(f"model.router_projections.{layer}", "must be a non-empty list of finite numbers")


@dataclass(frozen=True)
class LayerMemory:
    keys: torch.Tensor  # (n, d) fp16
    values: torch.Tensor  # (n, E) fp32
    stats: dict  # mean_nn_sq_dist[_l2]: the basis of sigma=auto; radius[_l2] when built with radius_quantile

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
        if not changed:
            return
        built_in, runs_in = mine.get("router_dtype"), signature.get("router_dtype")
        ours, theirs = mine.get("router_projections"), signature.get("router_projections")
        if isinstance(ours, dict) and isinstance(theirs, dict) and all(
                isinstance(ours.get(l), list) and same_weights(ours[l], theirs[l]) for l in changed):
            log.info("memory %s was built from this model's router weights in %s; this model holds them in %s, "
                     "rounded differently: the same model, so the memory applies", self.path, built_in, runs_in)
            return
        dtype = (f" (the memory was built with router weights in {built_in}, this model holds them in {runs_in}; "
                 "the same weights in another dtype are recognised, these differ beyond rounding)"
                 if built_in and runs_in and built_in != runs_in else "")
        raise KnnMoeError(
            f"{where}: the router weights of layers {changed} differ from this model's "
            f"({signature.get('name_or_path')!r}){dtype}, so its stored logits do not apply. Build a memory for "
            "this model."
        )


    @property
    def build_preset(self) -> str:
        """The preset the memory was built with (memories from before presets, or written directly: the paper)."""
        return self.manifest.get("build", {}).get("preset", "paper")

    def check_preset(self, preset: str) -> None:
        """Refuse evaluating with a preset whose build side is not the one this memory was built with."""
        from .options import BUILD_FIELDS, PRESETS

        def build_side(name: str) -> dict:
            return {k: v for k, v in PRESETS[name].items() if k in BUILD_FIELDS}

        if build_side(preset) != build_side(self.build_preset):
            raise KnnMoeError(
                f"memory {self.path} was built with preset={self.build_preset}, but it is evaluated with "
                f"preset={preset}: that preset's evaluation side expects a memory built its own way. Evaluate with "
                f"preset={self.build_preset}, or build a memory with preset={preset}."
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
    header = _header(n, d, n_exp)
    written = 0
    with atomic_path(path) as tmp:
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
    return sha256_file(path)


def write_memory_streamed(
    out_dir: str | Path,
    rows: Mapping[int, tuple[int, LayerRows]],
    signature: dict,
    build: dict | None = None,
    overwrite: bool = False,
    radius: RadiusSpec | None = None,
) -> Path:
    """Write a complete memory layer by layer from row chunks: rows[layer] = (n, iterable of (keys, values)).

    Iterables are consumed one layer at a time (pass generators to read each layer's rows only when it is
    written). The sigma statistics (and the confidence radius, `layer_stats`) are then computed from the
    written, memory-mapped file.
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
            **layer_stats(load_file(str(out / name))["keys"], radius, layer),
        }
    if radius is not None:  # never write a memory whose radius admits the model's own text (probe_tokens)
        radius.check_probe(entries, min(layers), f"memory {out}")
    from .. import __version__

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "knnmoe_eval_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": signature,
        "build": build or {},
        "layers": entries,
    }
    manifest[MANIFEST_SHA256] = manifest_digest(manifest)
    check_manifest(manifest, f"memory {out}")  # never write what loading would refuse
    write_card(out, manifest)  # before the manifest: a complete memory always has its card
    write_json_atomic(out / MANIFEST, manifest)
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
    if out.is_file():
        raise KnnMoeError(f"memory {out} is a file, not a memory directory; pass the directory that holds {MANIFEST}")
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
        manifest = json.loads((out / MANIFEST).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KnnMoeError(f"{out / MANIFEST} is not valid JSON ({e}); the memory is corrupted, rebuild it") from e
    if not isinstance(manifest, dict):
        raise KnnMoeError(f"{out / MANIFEST} is not a JSON object; the memory is corrupted, rebuild it")
    version = manifest.get("format_version")
    if manifest.get("format") == FORMAT and _is_int(version) and version > FORMAT_VERSION:
        raise KnnMoeError(
            f"{out} is a {FORMAT} v{version} memory, written by knnmoe-eval "
            f"{manifest.get('knnmoe_eval_version', '?')}; this knnmoe-eval reads v{FORMAT_VERSION}. Upgrade "
            "knnmoe-eval (pip install -U knnmoe-eval) to read it; the memory itself is fine."
        )
    if manifest.get("format") != FORMAT or version != FORMAT_VERSION:
        raise KnnMoeError(
            f"{out} is not a {FORMAT} v{FORMAT_VERSION} memory (found {manifest.get('format')!r} "
            f"v{manifest.get('format_version')!r}); rebuild it with this version of knnmoe-eval"
        )
    if manifest.get(MANIFEST_SHA256) != manifest_digest(manifest):
        raise KnnMoeError(
            f"{out / MANIFEST} was changed after the memory was written (its {MANIFEST_SHA256} does not match its "
            "content): the memory is corrupted or was edited by hand; rebuild it"
        )
    check_manifest(manifest, f"memory {out}")
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
        for name in ("radius", "radius_l2"):  # optional: memories built with radius_quantile (preset=plus)
            r = entry.get(name)
            if r is not None and not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
                raise KnnMoeError(f"{out / MANIFEST}: layer {layer} has {name}={r!r}, not a positive number; "
                                  "rebuild the memory")
        for name in ("mean_nn_dist", "mean_nn_dist_l2"):  # sigma=mean_nn's; absent from earlier memories
            r = entry.get(name)
            if r is not None and not (type(r) is float and math.isfinite(r) and r >= 0):
                raise KnnMoeError(f"{out / MANIFEST}: layer {layer} has {name}={r!r}, not a distance (a float "
                                  ">= 0, as the build writes it); rebuild the memory")
        stat_names = ("mean_nn_sq_dist", "mean_nn_sq_dist_l2", "mean_nn_dist", "mean_nn_dist_l2", "radius", "radius_l2")
        layers[int(layer)] = LayerMemory(keys, values, {k: entry[k] for k in stat_names if k in entry})
    return Memory(out, manifest, layers)

