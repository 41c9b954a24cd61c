"""The memory card: a README.md beside the manifest that a Hub page renders, for people browsing a memory.

Derived from the manifest and never read back: loading ignores it, so it is not under the manifest's checksums
(the manifest cannot list a checksum of a text written from the manifest itself). It is a pure function of the
manifest's canonical content without its write time (`created`) and checksum, so a rebuild or a resumed build of
the same memory writes the same bytes. The YAML front matter uses the Hub's model-card fields (`base_model`,
`library_name`, `tags`) through huggingface_hub's own `ModelCardData`; everything else the Hub has no field for is
under `knnmoe`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_path

CARD = "README.md"
_PLACEHOLDER = "ORG/NAME"  # the repo id, where the card is rendered before it has one (a local build)


def layer_file_bytes(num_keys: int, hidden_size: int, num_experts: int) -> int:
    """Size on disk of a layer file as `memory.write_layer_file` writes it: header, fp32 values, fp16 keys."""
    from .memory import _header

    return len(_header(num_keys, hidden_size, num_experts)) + num_keys * (num_experts * 4 + hidden_size * 2)


def hub_model_id(name_or_path: str) -> str | None:
    """`name_or_path` when it reads as a Hub model id (org/name), else None (a local path is no base_model)."""
    from .hub import split_hub_id

    return name_or_path if split_hub_id(name_or_path) == (name_or_path, None) else None


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    exp, unit = next((e, u) for e, u in ((9, "GB"), (6, "MB"), (3, "KB")) if n >= 10**e)
    return f"{n / 10**exp:.2f} {unit}"


def render_card(manifest: dict, repo_id: str | None = None) -> str:
    """The card's text for `manifest`; `repo_id` names the memory in the usage lines (a placeholder without)."""
    m = json.loads(json.dumps(manifest, sort_keys=True))  # canonical: a loaded and an in-memory manifest agree
    model, build = m["model"], m.get("build", {})
    d, n_exp = model["hidden_size"], model["num_experts"]
    layers = {int(k): v for k, v in m["layers"].items()}
    rows = {l: {"num_keys": e["num_keys"], "bytes": layer_file_bytes(e["num_keys"], d, n_exp),
                **{s: e[s] for s in ("mean_nn_sq_dist", "mean_nn_sq_dist_l2", "radius", "radius_l2") if s in e}}
            for l, e in sorted(layers.items())}
    total = sum(r["bytes"] for r in rows.values())
    preset = build.get("preset", "paper")
    settings = {k: v for k, v in build.items() if k not in ("tasks", "requests", "pruning", "pruned_from")}
    base = hub_model_id(model["name_or_path"])
    meta = {
        **({"base_model": base, "base_model_relation": "adapter"} if base else {}),
        "library_name": "knnmoe-eval",
        "tags": ["knnmoe-eval", "knn-moe", "mixture-of-experts", "moe-routing", model["model_type"]],
        "knnmoe": {
            "format_version": m["format_version"],
            "knnmoe_eval_version": m["knnmoe_eval_version"],
            "model": {k: model[k] for k in ("name_or_path", "revision", "model_type", "hidden_size", "num_experts",
                                            "top_k", "moe_layers") if k in model},
            "build_tasks": build.get("tasks", []),
            "reference_requests": build.get("requests"),
            "preset": preset,
            "build": settings,
            **({"pruning": build["pruning"]} if "pruning" in build else {}),
            "layers": {str(l): r for l, r in rows.items()},
            "bytes": total,
        },
    }
    from huggingface_hub import ModelCardData

    front = ModelCardData(**meta).to_yaml(line_break="\n")
    repo = repo_id or _PLACEHOLDER
    name = model["name_or_path"] or model["model_type"]
    revision = model.get("revision")
    pretrained = base or "MODEL"
    tasks = ", ".join(f"`{t}`" for t in build.get("tasks", [])) or "(not recorded: written outside a build)"
    lines = [
        "---", front, "---", "",
        f"# kNN-MoE memory for `{name}`", "",
        f"A [kNN-MoE](https://arxiv.org/abs/2601.02144) memory for `{name}` ({model['model_type']}"
        + (f", revision `{revision}`" if revision else "") + "): per MoE layer, router inputs (keys) of a labelled "
        "reference set and the router logits one gradient step on its gold answers gave them (values). At "
        "inference each token retrieves its nearest keys and mixes their values into the router's own logits; "
        "far from the memory the model is unchanged. It only applies to this model's router weights (loading "
        "checks their fingerprints).", "",
        f"- built from the task(s) {tasks}, {build.get('requests', '?')} reference requests, preset `{preset}`",
        f"- {len(rows)} MoE layers, hidden size {d}, {n_exp} experts, top-{model['top_k']}; "
        f"{_size(total)} on disk (layer files; trained indexes, when present, come in `index/`)",
        f"- written by knnmoe-eval {m['knnmoe_eval_version']}, memory format v{m['format_version']}", "",
        "## Evaluate with it", "",
        "With knnmoe-eval installed (it registers `hf-knnmoe` with lm-eval):", "",
        "```bash",
        f"lm_eval --model hf-knnmoe --model_args pretrained={pretrained},memory={repo} --tasks TASK",
        f"knnmoe-memory verify {repo}   # every checksum and the manifest's schema",
        "```", "",
        "Pin a revision with `memory_revision=<branch, tag or commit>` (the commit used is recorded in the results "
        "JSON under `config.knnmoe.memory`); `index=ivfpq` for the paper's fast search.", "",
        "## Layers", "",
        "| layer | keys | bytes | mean NN sq. distance | same, L2-normalised |",
        "|---:|---:|---:|---:|---:|",
        *(f"| {l} | {r['num_keys']} | {r['bytes']} | {_stat(r.get('mean_nn_sq_dist'))} | "
          f"{_stat(r.get('mean_nn_sq_dist_l2'))} |" for l, r in rows.items()),
        "",
        *(["## Build settings", "", "| setting | value |", "|---|---|",
           *(f"| `{k}` | `{json.dumps(v, sort_keys=True)}` |" for k, v in sorted(settings.items())), ""]
          if settings else []),
        "This card is written from `manifest.json` at every build; loading never reads it.", "",
    ]
    return "\n".join(lines)


def _stat(x) -> str:
    return "—" if x is None else f"{x:.6g}"


def write_card(directory: str | Path, manifest: dict) -> None:
    with atomic_path(Path(directory) / CARD) as tmp:
        tmp.write_text(render_card(manifest), encoding="utf-8")
