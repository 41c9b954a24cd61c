"""The offline toy demo, end to end through lm-eval: the README's main command (`make demo`).

1. train (or load from .cache/) the toy MoE of `knnmoe_eval.experiments.toy`: training domains plus a shifted domain whose
   answers the experts know but the router does not send the tokens to;
2. build kNN-MoE memories through lm-eval from the shifted domain's reference split (`knnmoe_toy_shift_ref`),
   with `preset=paper` (the paper's method) and `preset=plus` (our recipe, docs/plus.md; its confidence radius is
   kept clear of the toy's training-domain text, the train split, named with `calibration=`);
3. evaluate through lm-eval the stock model (`hf`) and `hf-knnmoe` with each memory on the shifted test split and
   on an in-domain split; print a table, save results/demo.json and results/demo.png (accuracy, lambda per layer).

`--toy second` and `--toy third` run the same on the generalisation toys of docs/plus.md (results/demo-second.*,
results/demo-third.*); `--uncalibrated` adds a plus memory built without calibration text, as a user who has none
builds it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import lm_eval
import lm_eval.tasks

from knnmoe_eval.experiments.toy import SECOND_TOY, THIRD_TOY, ToyConfig, data_file, train_or_load

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["knnmoe_toy_shift", "knnmoe_toy_indomain"]
TOYS = {"readme": ToyConfig(), "second": SECOND_TOY, "third": THIRD_TOY}


def evaluate(task_manager, model: str, model_args: str, tasks: list[str]) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=task_manager,
                                   batch_size=32, device="cpu")


def build(task_manager, toy_dir: Path, memory: Path, settings: dict) -> float | None:
    """Build `memory` through lm-eval; the build's wall seconds (None when an existing memory is reused)."""
    from knnmoe_eval.harness.lm import KnnMoeLM

    if (memory / "manifest.json").exists():
        print(f"reusing memory {memory}")
        return None
    lm = KnnMoeLM(pretrained=str(toy_dir), mode="build", memory=str(memory), batch_size=32, device="cpu", **settings)
    lm_eval.simple_evaluate(model=lm, tasks=["knnmoe_toy_shift_ref"], task_manager=task_manager)
    return lm.builder.wall_s  # the build pass alone, as SFT's training time


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_lam) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(rows)
    width = 0.38
    for i, task in enumerate(TASKS):
        ax_acc.bar([j + (i - 0.5) * width for j in range(len(names))], [rows[n][task] for n in names], width,
                   label=task.removeprefix("knnmoe_toy_"))
    ax_acc.set_xticks(range(len(names)), names)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    ax_acc.set_title("stock vs kNN-MoE (toy)")
    for name in names:
        lam = rows[name].get("lambda")
        if lam:
            layers = sorted(lam, key=int)
            ax_lam.plot([int(l) for l in layers], [lam[l] for l in layers], marker="o", label=name)
    ax_lam.set_xticks(sorted({int(l) for r in rows.values() for l in r.get("lambda", {})}))
    ax_lam.set_xlabel("MoE layer")
    ax_lam.set_ylabel("mean λ over all shifted-test tokens")
    ax_lam.set_ylim(0, 1)
    ax_lam.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(ROOT / ".cache"), help="where the trained toy model is kept")
    parser.add_argument("--memories", default=str(ROOT / "memories"), help="where the demo's memories are written")
    parser.add_argument("--out", default=str(ROOT / "results"), help="where demo.json and demo.png go")
    parser.add_argument("--toy", choices=tuple(TOYS), default="readme",
                        help="readme: the README's toy; second, third: the generalisation toys of docs/plus.md")
    parser.add_argument("--uncalibrated", action="store_true",
                        help="also build and evaluate preset=plus without calibration text")
    parser.add_argument("--k", type=int, default=None, help="neighbours per token (default: each preset's own)")
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    toy_dir = train_or_load(args.cache, TOYS[args.toy])
    tm = lm_eval.tasks.TaskManager(include_path=str(ROOT / "tasks" / "toy"), metadata={"toy_dir": str(toy_dir)})
    key = toy_dir.name
    methods = {"stock": ("hf", f"pretrained={toy_dir}")}
    # the toy's training-domain text (its train split, no test item) is what the plus memory must stay clear of
    presets = {"paper": ("paper", {}), "plus": ("plus", {"calibration": str(data_file(toy_dir, "train"))})}
    if args.uncalibrated:
        presets["plus, no calibration"] = ("plus", {})
    build_s = {}
    for name, (preset, extra) in presets.items():
        memory = Path(args.memories) / f"{key}-{name.replace(', no calibration', '-uncalibrated')}"
        build_s[f"kNN-MoE ({name})"] = build(tm, toy_dir, memory, {"preset": preset, **extra})
        k = "" if args.k is None else f",k={args.k}"
        methods[f"kNN-MoE ({name})"] = ("hf-knnmoe", f"pretrained={toy_dir},memory={memory}{k},preset={preset}")

    rows = {}
    for name, (model, model_args) in methods.items():
        shift = evaluate(tm, model, model_args, ["knnmoe_toy_shift"])
        indomain = evaluate(tm, model, model_args, ["knnmoe_toy_indomain"])
        rows[name] = {task: r["results"][task]["acc,none"] for task, r in
                      (("knnmoe_toy_shift", shift), ("knnmoe_toy_indomain", indomain))}
        diag = shift["config"].get("knnmoe", {}).get("diagnostics")
        if diag:
            rows[name]["lambda"] = {l: d["mean_lambda"] for l, d in diag.items()}
            rows[name]["topk_changed"] = {l: d["topk_changed"] for l, d in diag.items()}

    stock = rows["stock"]
    print(f"\ntoy model: {toy_dir}\n")
    print("| method | shifted acc | Δ vs stock | in-domain acc | in-domain kept | mean λ (shifted) | build s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        lam = r.get("lambda")
        lam_s = f"{sum(lam.values()) / len(lam):.3f}" if lam else "—"
        r["build_s"] = build_s.get(name)
        secs = "—" if r["build_s"] is None else f"{r['build_s']:.1f}"
        print(f"| {name} | {r['knnmoe_toy_shift']:.3f} | {r['knnmoe_toy_shift'] - stock['knnmoe_toy_shift']:+.3f} | "
              f"{r['knnmoe_toy_indomain']:.3f} | {r['knnmoe_toy_indomain'] / stock['knnmoe_toy_indomain']:.1%} | {lam_s} | "
              f"{secs} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "demo" if args.toy == "readme" else f"demo-{args.toy}"
    (out / f"{stem}.json").write_text(json.dumps({"toy_dir": str(toy_dir), "k": args.k, "rows": rows}, indent=2))
    plot(rows, out / f"{stem}.png")
    print(f"\nwrote {out / stem}.json and {out / stem}.png")


if __name__ == "__main__":
    main()
