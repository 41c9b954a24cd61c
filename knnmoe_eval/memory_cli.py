"""`knnmoe-memory`: one command line for memories (also `python -m knnmoe_eval.memory_cli`).

    knnmoe-memory inspect MEMORY                 what the manifest says; per-layer keys, bytes, sigma statistics
    knnmoe-memory verify MEMORY                  every checksum and the schema; exit status 1 on any defect
    knnmoe-memory prune MEMORY --pretrained M --out DIR [--min-change X] [--dedup Y]
    knnmoe-memory index MEMORY --index ivfpq     train and save an approximate index ahead of evaluation
    knnmoe-memory push MEMORY ORG/NAME           upload the memory and its card to a Hub repo, in one commit

MEMORY is a directory or, for inspect and verify, a Hub repo id as `memory=` takes it (`--revision`). Glue only:
the work is done by core (memory, prune, index, hub, card).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import KnnMoeError


def _source(args):
    from .core.hub import resolve_memory

    return resolve_memory(args.memory, args.revision)


def inspect(args) -> None:
    from .core.card import CARD, render_card
    from .core.index import INDEX_DIR
    from .core.memory import read_manifest

    source = _source(args)
    out = source.path
    manifest = read_manifest(out)  # its own checksum and schema; the layer files are not read
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return
    model, build = manifest["model"], manifest["build"]
    print(f"memory {out}" + (f" (Hub {source.repo_id} at commit {source.commit})" if source.repo_id else ""))
    print(f"  {manifest['format']} v{manifest['format_version']}, written by knnmoe-eval "
          f"{manifest['knnmoe_eval_version']} at {manifest['created']}")
    print(f"  model {model['name_or_path']!r}" + (f" revision {model['revision']}" if "revision" in model else "")
          + f" ({model['model_type']}): hidden {model['hidden_size']}, {model['num_experts']} experts, "
          f"top-{model['top_k']}, MoE layers {model['moe_layers']}")
    for key, value in sorted(build.items()):
        print(f"  build.{key} = {json.dumps(value, sort_keys=True)}")
    print(f"  {'layer':>5} {'keys':>10} {'bytes':>14} {'mean_nn_sq_dist':>16} {'mean_nn_sq_dist_l2':>18} radius")
    total = 0
    for layer, e in sorted(manifest["layers"].items(), key=lambda kv: int(kv[0])):
        file = out / e["file"]
        size = file.stat().st_size if file.exists() else None
        total += size or 0
        print(f"  {layer:>5} {e['num_keys']:>10} {size if size is not None else 'MISSING':>14} "
              f"{_num(e['mean_nn_sq_dist']):>16} {_num(e['mean_nn_sq_dist_l2']):>18} {_num(e.get('radius'))}")
    print(f"  {'total':>5} {sum(e['num_keys'] for e in manifest['layers'].values()):>10} {total:>14}")
    for path in sorted((out / INDEX_DIR).glob("*.faiss")) if (out / INDEX_DIR).is_dir() else []:
        print(f"  index {path.relative_to(out)}: {path.stat().st_size} bytes")
    card = out / CARD
    state = ("missing" if not card.is_file() else "as the manifest renders it"
             if card.read_text(encoding="utf-8") == render_card(manifest) else "edited (or from another version)")
    print(f"  card {CARD}: {state}")


def _num(x) -> str:
    return "-" if x is None else f"{x:.6g}"


def verify(args) -> int:
    from .core.hub import verified_files

    source = _source(args)
    try:
        files = verified_files(source.path)  # what loading checks, and the saved indexes
    except KnnMoeError as e:
        print(f"DEFECT: {e}", file=sys.stderr)
        return 1
    print(f"ok: {source.path}: manifest and {len(files) - 1} files verified ({', '.join(files[1:])})")
    return 0


def prune(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from .core.prune import prune_memory

    model = AutoModelForCausalLM.from_pretrained(args.pretrained, dtype=torch.float32)
    out, counts = prune_memory(_source(args).path, args.out, model, args.min_change, args.dedup)
    for layer, (before, after) in counts.items():
        print(f"layer {layer}: {before} -> {after} keys ({100 * after / max(before, 1):.1f}%)")
    print(f"pruned memory written to {out}")


def index(args) -> None:
    from tqdm import tqdm

    from .core import index as knn_index
    from .core.hub import split_hub_id
    from .core.memory import load_memory

    if not Path(args.memory).is_dir():
        hint = " (a Hub id: download it, or run this where it was built, then push)" if split_hub_id(args.memory) \
            else ""
        raise KnnMoeError(f"knnmoe-memory index writes into the memory directory, and {args.memory} is none{hint}")
    memory = load_memory(args.memory)
    normalize = args.similarity in ("rbf_l2", "cosine")
    for layer, mem in tqdm(sorted(memory.layers.items()), desc=f"training {args.index}", unit="layer"):
        n, d = mem.keys.shape
        plan = knn_index.plan(args.index, d, n, args.nprobe)
        if plan.exact:
            raise KnnMoeError("index=exact searches the stored keys themselves: there is nothing to train or save")
        if n == 0:
            continue  # retrieval leaves an empty layer's router stock
        entry = memory.manifest["layers"][str(layer)]
        knn_index.load_or_build(mem.keys, plan.factory, plan.nprobe, normalize, memory.path, layer, entry["sha256"])
        path = knn_index.index_path(memory.path, layer, knn_index.index_spec(plan.factory, normalize,
                                                                              entry["sha256"]))
        if not path.exists():  # load_or_build logged why it could not save
            raise KnnMoeError(f"the trained index of layer {layer} could not be saved to {path}")
        print(f"layer {layer}: {plan.factory} -> {path.relative_to(memory.path)} ({path.stat().st_size} bytes)")


def push(args) -> None:
    from .core.hub import push_memory

    info = push_memory(args.memory, args.repo_id, revision=args.revision, path_in_repo=args.path_in_repo,
                       private=args.private, create_pr=args.create_pr, commit_message=args.message)
    print(f"pushed {args.memory} to {args.repo_id}: {getattr(info, 'commit_url', info)}")


def parser() -> argparse.ArgumentParser:
    from .core.mixing import SIMILARITIES

    p = argparse.ArgumentParser(prog="knnmoe-memory", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def memory_arg(q, hub: bool):
        q.add_argument("memory", help="memory directory" + (" or Hub repo id org/name[/subfolder]" if hub else ""))
        if hub:
            q.add_argument("--revision", default="main", help="Hub ids: branch, tag or commit (default main)")

    q = sub.add_parser("inspect", help="print what the manifest says and the per-layer sizes and statistics")
    memory_arg(q, hub=True)
    q.add_argument("--json", action="store_true", help="print the manifest itself")
    q.set_defaults(run=inspect)

    q = sub.add_parser("verify", help="check every checksum and the schema; exit status 1 on any defect")
    memory_arg(q, hub=True)
    q.set_defaults(run=verify)

    q = sub.add_parser("prune", help="write a pruned copy (unchanged routing, near-duplicate keys)")
    memory_arg(q, hub=True)
    q.add_argument("--pretrained", required=True, help="the model the memory was built for (its routers are needed)")
    q.add_argument("--out", required=True, help="directory for the pruned memory")
    q.add_argument("--min-change", type=float, default=None,
                   help="drop entries routing to the same experts as the stock logits with weights within this")
    q.add_argument("--dedup", type=float, default=None,
                   help="drop keys within this fraction of the mean nearest-neighbour distance of a kept key")
    q.set_defaults(run=prune)

    q = sub.add_parser("index", help="train and save an approximate index next to the memory (reused at load)")
    memory_arg(q, hub=False)
    q.add_argument("--index", default="ivfpq",
                   help="ivfpq | ivfpq_rerank | hnsw | a faiss factory string, as the index= model_arg")
    q.add_argument("--similarity", default="rbf", choices=SIMILARITIES,
                   help="the similarity it will be evaluated with (rbf_l2 and cosine index normalised keys)")
    q.add_argument("--nprobe", type=int, default=None, help="as the nprobe= model_arg (not part of the saved index)")
    q.set_defaults(run=index)

    q = sub.add_parser("push", help="upload the memory and its card to a Hub repo in one commit")
    memory_arg(q, hub=False)
    q.add_argument("repo_id", help="the Hub model repo, org/name (created if missing)")
    q.add_argument("--revision", default=None, help="branch to commit to (default: the repo's default branch)")
    q.add_argument("--path-in-repo", default=None, help="a subfolder of the repo (memory=org/name/SUBFOLDER)")
    q.add_argument("--private", action="store_true", help="create the repo private")
    q.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    q.add_argument("--message", default=None, help="commit message")
    q.set_defaults(run=push)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("knnmoe_eval").setLevel(logging.INFO)  # progress of index training; not faiss's loader
    args = parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KnnMoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
