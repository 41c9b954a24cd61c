"""Peak RAM of finalizing a memory build against the size of one layer's keys: the merge must stream.

Writes a synthetic partial build (shards as `MemoryBuilder.run` flushes them: fp16 keys and fp32 values of every
layer, with their requests in the metadata, in shuffled request order and with some padding duplicates), then runs
`MemoryBuilder.finalize` in a fresh process and samples its resident memory every 5 ms. "anon" is private memory
(what cannot be paged out without swap); "rss" also counts the pages of the memory-mapped shards and layer files,
which the kernel drops under pressure. A merge that held a layer would need at least its keys in anon memory (the
previous finalize held every layer's keys, then float32 copies of a layer for the sigma statistics).

    OMP_NUM_THREADS=2 python scripts/perf_memory.py --keys 200000 --layers 2
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from machine_load import Load, require_quiet


def model(d: int, experts: int, layers: int):
    """An OLMoE with the real router shape and negligible expert weights (the merge never runs the model)."""
    from knnmoe_eval.testing import make_tiny_model

    return make_tiny_model("olmoe", num_hidden_layers=layers, hidden_size=d, intermediate_size=8, num_experts=experts,
                           num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=16, head_dim=d // 16)


def builder(out: Path, args):
    from knnmoe_eval.core.build import MemoryBuilder
    from knnmoe_eval.core.options import KnnMoeOptions
    from knnmoe_eval.core.routers import find_routers
    from knnmoe_eval.core.signature import model_signature

    m = model(args.d, args.experts, args.layers)
    sites = find_routers(m)
    return MemoryBuilder(m, sites, model_signature(m, sites), KnnMoeOptions(memory=str(out), mode="build"))


def write_partial_build(out: Path, args) -> None:
    from knnmoe_eval.core.build import BUILD_STATE
    from knnmoe_eval.core.files import save_tensors_atomic, write_json_atomic

    b = builder(out, args)  # it owns `out` (creates it, takes its lock) until release below
    write_json_atomic(out / BUILD_STATE, b._state())
    (out / "shards").mkdir()
    per_request = 100
    rids = [("bench", i, 0) for i in range(args.keys // per_request)]
    random.Random(0).shuffle(rids)  # shards hold requests in run order (longest first), not request order
    rids += rids[:3]  # lm-eval's padding duplicates
    g = torch.Generator().manual_seed(0)
    per_shard = args.shard_rows // per_request
    for no, start in enumerate(range(0, len(rids), per_shard)):
        chunk = rids[start : start + per_shard]
        n = per_request * len(chunk)
        tensors = {}
        for s in b.sites:
            tensors[f"keys.{s.layer}"] = torch.randn(n, args.d, generator=g).half()
            tensors[f"values.{s.layer}"] = torch.randn(n, args.experts, generator=g)
        meta = {"rids": chunk, "loglik": [(0.0, False)] * len(chunk), "counts": [per_request] * len(chunk)}
        save_tensors_atomic(out / "shards" / f"shard_000_{no:06d}.safetensors", tensors,
                            metadata={"build": json.dumps(meta)})
    b.release()  # finalize runs in a fresh process


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def finalize_and_measure(out: Path, args) -> dict:
    b = builder(out, args)
    base_anon, base_rss = _status_kb("RssAnon"), _status_kb("VmRSS")
    peak = {"anon": base_anon, "rss": base_rss}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
            peak["rss"] = max(peak["rss"], _status_kb("VmRSS"))
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    b.finalize()
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    return {"finalize_s": round(seconds, 1), "peak_anon_mb": round((peak["anon"] - base_anon) / 1024, 1),
            "peak_rss_mb": round((peak["rss"] - base_rss) / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=200_000, help="keys per layer")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--shard-rows", type=int, default=20_000, help="rows per shard (shard_tokens)")
    p.add_argument("--workdir", type=Path, default=None, help="an existing directory for the synthetic build "
                   "(default: the system's temporary directory)")
    p.add_argument("--json", type=Path, default=Path("results/perf_memory.json"))
    p.add_argument("--finalize", type=Path, default=None, help=argparse.SUPPRESS)  # the measured child process
    p.add_argument("--allow-load", action="store_true", help="measure even when other processes are busy")
    args = p.parse_args()
    if args.finalize is not None:
        print(json.dumps(finalize_and_measure(args.finalize, args)))
        return
    quiet = require_quiet(args.allow_load)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        out = Path(tmp) / "mem"
        write_partial_build(out, args)
        child = [sys.executable, __file__, "--finalize", str(out), "--keys", str(args.keys), "--layers",
                 str(args.layers), "--d", str(args.d), "--experts", str(args.experts)]
        with Load() as load:
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        figures = json.loads(out.splitlines()[-1])
        layer_mb = args.keys * args.d * 2 / 2**20
        row = {"keys_per_layer": args.keys, "layers": args.layers, "d": args.d, "shard_rows": args.shard_rows,
               "layer_keys_mb": round(layer_mb, 1), **figures,
               "peak_anon_over_layer": round(figures["peak_anon_mb"] / layer_mb, 3),
               "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_at_start": quiet, **load.record}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=2))
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
