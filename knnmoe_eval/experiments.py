"""The paper's experiments in one command: every method on every benchmark, Table 1 with significance, ablations.

    python -m knnmoe_eval.experiments table  --pretrained toy --benchmarks toy_shift,toy_indomain
    python -m knnmoe_eval.experiments ablate --pretrained toy --benchmarks toy_shift --which n,k,steps
    python -m knnmoe_eval.experiments table  --pretrained allenai/OLMoE-1B-7B-0125-Instruct \\
        --benchmarks gpqa,medqa,medmcqa,mmlu,supergpqa,mbpp --scoring gen --allow_code_execution

Every run goes through lm-eval (`simple_evaluate` with `hf`, `hf` + `peft=`, or `hf-knnmoe`) with samples logged,
so every method is scored per test item by the same task and the same answer parsing, and any two methods can be
compared item by item (paired bootstrap, perplexity buckets, Selective). Each piece (memory, adapter, per-item
scores) is written under `--out` as it finishes and reused when the command runs again with the same settings;
changed settings recompute only the pieces they affect.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import KnnMoeError
from .memory import write_json_atomic
from .options import PRESETS, default
from .stats import lowest_fraction, paired_bootstrap

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
DENSE = {"grad": "dense"}  # the build settings of the `grad=dense` rows
PLUS = {"preset": "plus"}  # the build and evaluation setting of the `preset=plus` rows (docs/plus.md)


@dataclass(frozen=True)
class Benchmark:
    """The lm-eval tasks of one benchmark: test (multiple-choice loglikelihood and/or generative), references."""

    name: str
    ref: str
    test: str | None = None  # multiple-choice loglikelihood
    gen: str | None = None  # generative, the paper's scoring
    fewshot: str | None = None  # generative, 5 most similar references in the prompt
    ref_mc: str | None = None  # the references as multiple choice, for pseudo-labels

    def test_task(self, scoring: str) -> str:
        task = self.gen if scoring == "gen" else self.test
        if task is None:
            raise KnnMoeError(f"benchmark {self.name} has no {scoring} test task; use --scoring "
                              f"{'loglik' if scoring == 'gen' else 'gen'}")
        return task


def _paper(name: str, mc: bool = True) -> Benchmark:
    return Benchmark(name, ref=f"knnmoe_{name}_ref", test=f"knnmoe_{name}" if mc else None, gen=f"knnmoe_{name}_gen",
                     fewshot=f"knnmoe_{name}_5shot", ref_mc=f"knnmoe_{name}_ref_mc" if mc else None)


BENCHMARKS = {
    **{b: _paper(b) for b in ("gpqa", "medqa", "medmcqa", "mmlu", "supergpqa")},
    "mbpp": _paper("mbpp", mc=False),
    # The toy's context window (64 positions) cannot hold five examples, so it has no 5-shot task.
    "toy_shift": Benchmark("toy_shift", ref="knnmoe_toy_shift_ref", test="knnmoe_toy_shift",
                           ref_mc="knnmoe_toy_shift_ref_mc"),
    "toy_indomain": Benchmark("toy_indomain", ref="knnmoe_toy_indomain_ref", test="knnmoe_toy_indomain",
                              ref_mc="knnmoe_toy_indomain_ref_mc"),
}


@dataclass(frozen=True)
class Settings:
    pretrained: str
    out: str = "results/experiments"
    benchmarks: tuple[str, ...] = ("toy_shift",)
    scoring: str = "loglik"  # loglik: multiple-choice loglikelihood; gen: generation + answer parsing (paper)
    limit: int | None = None  # test items per benchmark
    ref_limit: int | None = None  # reference items per benchmark (N)
    include_path: str = str(TASKS_DIR)
    metadata: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 32
    parallelize: bool = False  # shard a model too large for one GPU over all visible GPUs (hf's parallelize=True)
    eta: float = default("eta")  # the build's defaults are hf-knnmoe's (options.py), never restated here
    k: int = default("k")
    steps: int = default("steps")
    # lm-eval's prompt formatting, passed to every method's runs, builds and SFT data alike
    apply_chat_template: bool | str = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False
    # the paper's Table 15 (AdamW, weight decay 0.01, linear decay and alpha = r are sft.py's own)
    sft_epochs: int = 3
    sft_batch_size: int = 16
    lora_r: int = 32
    lora_lr: float | None = None  # None: sft.DEFAULT_LR
    router_lr: float | None = None
    selective_fraction: float = 1 / 3
    bootstrap: int = 1000
    seed: int = 0
    allow_code_execution: bool = False
    gen_kwargs: str | None = None  # overrides the generative tasks' generation_kwargs, e.g. max_gen_toks=64
    judge: str | None = None  # labeller for the unlabelled ablation: knn-dense | lm-eval "MODEL:ARGS"
    calibration: str | None = None  # preset=plus builds: not-this-domain text capping the radius (docs/plus.md)
    cache: str = ".cache"
    # ablation grids (paper §6; values its text export lost are marked in docs/experiments.md). None in
    # n_values is the whole reference set.
    n_values: tuple[int | None, ...] = (0, 1_000, 10_000, None)
    k_values: tuple[int, ...] = (1, 2, 4, 8)
    step_values: tuple[int, ...] = (1, 2, 4)
    similarities: tuple[str, ...] = ("rbf", "rbf_l2", "cosine")

    def __post_init__(self):
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise KnnMoeError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
        if self.scoring not in ("loglik", "gen"):
            raise KnnMoeError(f"--scoring {self.scoring!r}: choose loglik or gen")


class Runner:
    """Builds, trains and evaluates what a table or an ablation asks for, reusing whatever is already on disk."""

    def __init__(self, settings: Settings):
        import lm_eval.tasks

        self.s = settings
        self.out = Path(settings.out)
        self.pretrained = settings.pretrained
        metadata = dict(settings.metadata)
        from .toy import is_toy_dir, train_or_load

        if self.pretrained == "toy":
            self.pretrained = str(train_or_load(settings.cache))
        if is_toy_dir(self.pretrained):
            metadata.setdefault("toy_dir", self.pretrained)
        self.metadata = metadata
        # every benchmark is one of ours: lm-eval's own task index would only cost seconds per run
        self.task_manager = lm_eval.tasks.TaskManager(include_path=settings.include_path, include_defaults=False,
                                                      metadata=metadata)
        self._base = None

    @property
    def prompt_format(self) -> dict:
        """lm-eval's prompt-formatting arguments, as `simple_evaluate` takes them."""
        return {"apply_chat_template": self.s.apply_chat_template, "system_instruction": self.s.system_instruction,
                "fewshot_as_multiturn": self.s.fewshot_as_multiturn}

    # -- models --------------------------------------------------------------------------------------------------
    @property
    def base(self):
        """The stock model, loaded once and shared by every run that does not change its weights."""
        if self._base is None:
            from lm_eval.models.huggingface import HFLM

            self._base = HFLM(pretrained=self.pretrained, device=self.s.device, dtype=self.s.dtype,
                              batch_size=self.s.batch_size, parallelize=self.s.parallelize)
        return self._base

    def knn_lm(self, memory: Path, **options):
        from .lm import KnnMoeLM

        return KnnMoeLM(pretrained=self.base.model, tokenizer=self.base.tokenizer, batch_size=self.s.batch_size,
                        memory=str(memory), **options)

    def peft_lm(self, adapter: Path):
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=self.pretrained, peft=str(adapter), device=self.s.device, dtype=self.s.dtype,
                    batch_size=self.s.batch_size, parallelize=self.s.parallelize)

    def judge_lm(self, bench: Benchmark):
        """The judge that labels references in the unlabelled ablation: `knn-dense` is this model with its
        gold-built dense-gradient memory; anything else is an lm-eval model spec `MODEL:ARGS`."""
        if self.s.judge == "knn-dense":
            return self.knn_lm(self.memory(bench, **DENSE), k=self.s.k)
        from lm_eval.api.registry import get_model

        model, _, args = self.s.judge.partition(":")
        return get_model(model).create_from_arg_string(args, {"batch_size": self.s.batch_size, "device": self.s.device})

    # -- pieces on disk ------------------------------------------------------------------------------------------
    def _evaluate(self, lm, task: str, limit: int | None) -> dict:
        import lm_eval

        return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=self.task_manager, limit=limit,
                                       log_samples=True, gen_kwargs=self.s.gen_kwargs, bootstrap_iters=0,
                                       confirm_run_unsafe_code=self.s.allow_code_execution,
                                       **self.prompt_format,
                                       random_seed=self.s.seed, numpy_random_seed=self.s.seed,
                                       torch_random_seed=self.s.seed, fewshot_random_seed=self.s.seed)

    def memory(self, bench: Benchmark, *, n: int | None = None, **build) -> Path:
        """The kNN-MoE memory of `bench` built from its first `n` references (all by default) through lm-eval."""
        if build.get("preset", "paper") == "paper":  # the runner's η and T are the paper rows'; a preset has its own
            build = {"eta": self.s.eta, "steps": self.s.steps, "grad": "paper", **build}
        elif self.s.calibration:
            build = {"calibration": self.s.calibration, **build}
        n = self.s.ref_limit if n is None else n
        name = "-".join([bench.name, f"n{n if n is not None else 'all'}"] +
                        [f"{k}{Path(str(v)).stem if k in ('labels', 'calibration') else v}"
                         for k, v in sorted(build.items()) if v is not None] +
                        (["chat"] if self.s.apply_chat_template else []))
        path = self.out / "memories" / name
        if not (path / "manifest.json").exists():
            lm = self.knn_lm(path, mode="build", **build)
            self._evaluate(lm, bench.ref, limit=n)
            write_json_atomic(self.out / "memories" / f"{name}.build.json",
                       {"wall_s": lm.build_wall_s, "references": n, **build})
        return path

    def adapter(self, bench: Benchmark, method: str) -> Path:
        """A LoRA or router-only SFT adapter trained on `bench`'s references (see `sft.py`)."""
        from .sft import train_sft

        lr = self.s.lora_lr if method == "lora" else self.s.router_lr
        rank = f"-r{self.s.lora_r}" if method == "lora" else ""
        chat = "-chat" if self.s.apply_chat_template else ""
        path = self.out / "adapters" / (f"{bench.name}-{method}-n{self.s.ref_limit or 'all'}-lr{lr or 'default'}"
                                        f"-e{self.s.sft_epochs}-b{self.s.sft_batch_size}{rank}{chat}-s{self.s.seed}")
        train_sft(self.pretrained, [bench.ref], path, method, include_path=self.s.include_path,
                  metadata=self.metadata, limit=self.s.ref_limit, seed=self.s.seed, epochs=self.s.sft_epochs,
                  lr=lr, batch_size=self.s.sft_batch_size, lora_r=self.s.lora_r, prompt=self.prompt_format,
                  device=self.s.device, dtype="float32" if self.s.dtype == "auto" else self.s.dtype, progress=True)
        return path

    def scores(self, run: str, bench: Benchmark, make_lm, task: str | None = None, config: dict | None = None) -> dict:
        """Per-item scores of one method on one benchmark's test task, cached as JSON under runs/<run>/."""
        task = task or bench.test_task(self.s.scoring)
        config = {"task": task, "limit": self.s.limit, "gen_kwargs": self.s.gen_kwargs, **self.prompt_format,
                  **(config or {})}
        path = self.out / "runs" / run / f"{bench.name}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            if cached["config"] == config:
                return cached
        lm = make_lm()
        start = time.perf_counter()
        result = self._evaluate(lm, task, self.s.limit)
        wall = time.perf_counter() - start
        samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
        metric = "pass@1" if "pass@1" in samples[0] else "acc"
        record = {
            "config": config,
            "metric": metric,
            "doc_ids": [s["doc_id"] for s in samples],
            "scores": [float(s[metric]) for s in samples],
            "contexts": [s["arguments"][0][0] for s in samples],
            "wall_s": wall,
            "diagnostics": result["config"].get("knnmoe", {}).get("diagnostics"),
        }
        write_json_atomic(path, record)
        return record

    def perplexity(self, bench: Benchmark) -> np.ndarray:
        """Zero-shot perplexity of each test item's prompt under the stock model (Table 2 buckets, Selective)."""
        zero = self.zero_shot(bench)
        path = self.out / "runs" / "zero-shot" / f"{bench.name}.ppl.json"
        cached = json.loads(path.read_text()) if path.exists() else None
        if cached is not None and cached["doc_ids"] == zero["doc_ids"]:
            return np.array(cached["ppl"])
        from lm_eval.api.instance import Instance

        requests = [Instance("loglikelihood_rolling", doc={}, arguments=(c,), idx=0) for c in zero["contexts"]]
        logliks = self.base.loglikelihood_rolling(requests, disable_tqdm=True)
        tokens = [max(1, len(self.base.tok_encode(c))) for c in zero["contexts"]]
        ppl = [float(np.exp(-ll / n)) for ll, n in zip(logliks, tokens)]
        write_json_atomic(path, {"doc_ids": zero["doc_ids"], "ppl": ppl})
        return np.array(ppl)

    # -- methods -------------------------------------------------------------------------------------------------
    def zero_shot(self, bench: Benchmark) -> dict:
        return self.scores("zero-shot", bench, lambda: self.base)

    def knn(self, bench: Benchmark, run: str = "knn", *, n: int | None = None, build: dict | None = None,
            **options) -> dict:
        if n == 0:  # N = 0 is the stock model: an empty reference set
            return self.zero_shot(bench)
        options = {"k": self.s.k, **options}
        memory = self.memory(bench, n=n, **(build or {}))
        return self.scores(run, bench, lambda: self.knn_lm(memory, **options),
                           config={"memory": memory.name, **options})

    def knn_ivfpq(self, bench: Benchmark) -> dict:
        return self.knn(bench, "knn-ivfpq", index="ivfpq")

    def knn_dense(self, bench: Benchmark) -> dict:
        return self.knn(bench, "knn-dense", build=DENSE)

    def knn_plus(self, bench: Benchmark) -> dict:
        return self.knn(bench, "knn-plus", build=PLUS, **PLUS)

    def selective(self, bench: Benchmark) -> dict:
        """kNN-MoE with retrieval skipped on the lowest-perplexity third of the test items (paper Table 3).

        Retrieval acts on each item alone, so skipping it for an item gives exactly that item's zero-shot score:
        the two finished runs are combined item by item instead of running a third pass.
        """
        zero, knn = self.zero_shot(bench), self.knn(bench)
        skip = lowest_fraction(self.perplexity(bench), self.s.selective_fraction)
        scores = np.where(skip, zero["scores"], knn["scores"])
        return {**knn, "scores": [float(x) for x in scores], "skipped": int(skip.sum())}

    def methods(self, bench: Benchmark) -> dict[str, dict]:
        """Table 1's rows for one benchmark, in the paper's order. A method that cannot run here (e.g. IVFPQ on a
        memory too small to train it) gets {"error": why}, which the table prints under itself."""
        methods = {"Zero-shot": lambda: self.zero_shot(bench)}
        if self.s.scoring == "gen" and bench.fewshot:
            methods["5-shot (similar)"] = lambda: self.five_shot(bench)
        methods["LoRA SFT"] = lambda: self.sft(bench, "lora")
        methods["Router-only SFT"] = lambda: self.sft(bench, "router")
        methods["kNN-MoE"] = lambda: self.knn(bench)
        methods["kNN-MoE (IVFPQ)"] = lambda: self.knn_ivfpq(bench)
        methods["kNN-MoE (Selective)"] = lambda: self.selective(bench)
        methods["kNN-MoE (grad=dense)"] = lambda: self.knn_dense(bench)
        methods["kNN-MoE (plus)"] = lambda: self.knn_plus(bench)
        rows = {}
        for name, run in methods.items():
            try:
                rows[name] = run()
            except KnnMoeError as e:
                if name == "Zero-shot":
                    raise
                log.error("%s on %s: %s", name, bench.name, e)
                rows[name] = {"error": str(e)}
        return rows

    def five_shot(self, bench: Benchmark) -> dict:
        """The 5 most similar references in the prompt; the record names the encoder that chose them."""
        from . import fewshot

        record = self.scores("5-shot", bench, lambda: self.base, task=bench.fewshot)
        if "encoder" not in record:  # a fresh run: the sampler has just chosen its encoder
            record["encoder"] = fewshot.chosen_encoder()
            write_json_atomic(self.out / "runs" / "5-shot" / f"{bench.name}.json", record)
        return record

    def sft(self, bench: Benchmark, method: str) -> dict:
        adapter = self.adapter(bench, method)
        return self.scores(f"sft-{method}", bench, lambda: self.peft_lm(adapter), config={"adapter": adapter.name})


def table(runner: Runner) -> dict:
    """Table 1: accuracy per benchmark and on all test items together ("Avg."), † where a paired bootstrap against
    zero-shot gives p < 0.05. Writes table.md and table.json under --out and returns the JSON."""
    s = runner.s
    per_bench = {b: runner.methods(BENCHMARKS[b]) for b in s.benchmarks}
    methods = list(dict.fromkeys(m for rows in per_bench.values() for m in rows))
    cells: dict[str, dict] = {}
    for method in methods:
        cells[method] = {}
        columns = {b: (per_bench[b][method]["scores"], per_bench[b]["Zero-shot"]["scores"])
                   if "scores" in per_bench[b].get(method, {}) else None for b in s.benchmarks}
        # "Avg." is over all test items together, so only for methods that ran on every benchmark
        columns["Avg."] = None if None in columns.values() else tuple(
            np.concatenate([c[i] for c in columns.values()]) for i in (0, 1))
        for col, pair in columns.items():
            if pair is None:
                cells[method][col] = None
                continue
            scores, zero = pair
            scores, zero = np.asarray(scores, float), np.asarray(zero, float)
            p = None if method == "Zero-shot" else paired_bootstrap(scores, zero, s.bootstrap, s.seed)
            cells[method][col] = {"score": float(scores.mean()), "n": int(scores.size),
                                  "delta": float(scores.mean() - zero.mean()), "p": p,
                                  "significant": p is not None and p < 0.05}
    errors = {f"{m} on {b}": per_bench[b][m]["error"] for m in methods for b in s.benchmarks
              if "error" in per_bench[b].get(m, {})}
    notes = [f"kNN-MoE memories: η = {s.eta:g}, T = {s.steps}, loss = {default('loss')}, positions = {default('positions')}; k = {s.k}, similarity = "
             f"{default('similarity')} (hf-knnmoe's defaults unless set).",
             f"kNN-MoE (plus): preset=plus ({', '.join(f'{k} = {v}' for k, v in PRESETS['plus'].items())}), "
             f"calibration text: {s.calibration or 'none (radius_scale = 1)'}; docs/plus.md."]
    from .fewshot import QWEN3

    encoders = {per_bench[b]["5-shot (similar)"].get("encoder") for b in s.benchmarks
                if "5-shot (similar)" in per_bench[b]} - {QWEN3}
    if encoders:
        notes.append(f"5-shot (similar) chose its examples with {', '.join(map(str, sorted(encoders)))}, NOT the "
                     f"paper's {QWEN3} (not available locally).")
    result = {"settings": {**asdict(s), "pretrained": runner.pretrained}, "methods": methods,
              "columns": [*s.benchmarks, "Avg."], "table": cells, "errors": errors, "notes": notes,
              "wall_s": {m: {b: per_bench[b][m].get("wall_s") for b in s.benchmarks if m in per_bench[b]}
                         for m in methods}}
    write_json_atomic(runner.out / "table.json", result)
    (runner.out / "table.md").write_text(render_table(cells, errors, notes))
    return result


def render_table(cells: dict, errors: dict | None = None, notes: list[str] | None = None) -> str:
    columns = list(next(iter(cells.values())))
    lines = ["| Method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for method, row in cells.items():
        lines.append(f"| {method} | " + " | ".join(
            "—" if c is None else f"{100 * c['score']:.2f}{'†' if c['significant'] else ''}" for c in row.values())
            + " |")
    lines.append("| *test items* | " + " | ".join(str(c["n"]) for c in cells["Zero-shot"].values()) + " |")
    lines.append("\n† paired bootstrap against Zero-shot, p < 0.05 (two-sided).")
    lines += [f"— {where}: {why}" for where, why in (errors or {}).items()]
    lines += list(notes or [])
    return "\n".join(lines) + "\n"


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__ and v is not None}
    values["benchmarks"] = tuple(args.benchmarks.split(","))
    grids = {"n_values": lambda v: None if v == "all" else int(v), "k_values": int, "step_values": int,
             "similarities": str}
    for name, parse in grids.items():
        if getattr(args, name, None):
            values[name] = tuple(parse(v) for v in getattr(args, name).split(","))
    values["metadata"] = json.loads(args.metadata) if args.metadata else {}
    return Settings(**values)


def main(argv: list[str] | None = None) -> None:
    from . import ablations

    parser = argparse.ArgumentParser(prog="python -m knnmoe_eval.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("table", "ablate"))
    parser.add_argument("--pretrained", required=True, help="model path or hub id; 'toy' trains/loads the toy MoE")
    parser.add_argument("--benchmarks", default="toy_shift", help=f"comma-separated, from {', '.join(BENCHMARKS)}")
    parser.add_argument("--which", default=",".join(ablations.ABLATIONS),
                        help=f"ablate: comma-separated, from {', '.join(ablations.ABLATIONS)}")
    parser.add_argument("--out")
    parser.add_argument("--scoring", choices=("loglik", "gen"))
    parser.add_argument("--limit", type=int, help="test items per benchmark")
    parser.add_argument("--ref_limit", type=int, help="references per benchmark (N)")
    parser.add_argument("--include_path")
    parser.add_argument("--metadata", help="JSON passed to the tasks, e.g. '{\"data_dir\": \"...\"}'")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--parallelize", action="store_true", default=None,
                        help="shard the model over all visible GPUs (for models larger than one GPU)")
    parser.add_argument("--eta", type=float, help=f"build step size (default {default('eta'):g}, as hf-knnmoe's)")
    parser.add_argument("--k", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--apply_chat_template", nargs="?", const=True,
                        help="as lm_eval's: format every method's prompts (runs, builds, SFT data) with the chat template")
    parser.add_argument("--system_instruction")
    parser.add_argument("--fewshot_as_multiturn", action="store_true", default=None)
    parser.add_argument("--sft_epochs", type=int)
    parser.add_argument("--sft_batch_size", type=int, help="SFT batch size (default 16, the paper's)")
    parser.add_argument("--lora_r", type=int, help="LoRA rank, alpha = r (default 32, the paper's)")
    parser.add_argument("--n_values", help="N ablation grid, comma-separated; 'all' = the whole reference set")
    parser.add_argument("--k_values", help="k ablation grid (default 1,2,4,8)")
    parser.add_argument("--step_values", help="T ablation grid (default 1,2,4)")
    parser.add_argument("--similarities", help="similarity ablation grid (default rbf,rbf_l2,cosine)")
    parser.add_argument("--lora_lr", type=float, help="LoRA SFT learning rate (toy: 3e-3)")
    parser.add_argument("--router_lr", type=float, help="router-only SFT learning rate (toy: 3e-2)")
    parser.add_argument("--bootstrap", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--allow_code_execution", action="store_true", default=None,
                        help="run MBPP's generated code (also needs HF_ALLOW_CODE_EVAL=1)")
    parser.add_argument("--gen_kwargs", help="override generation settings of generative tasks, e.g. max_gen_toks=64")
    parser.add_argument("--judge", help="unlabelled ablation: knn-dense, or an lm-eval model spec MODEL:ARGS")
    parser.add_argument("--cache", help="where the toy model is cached")
    parser.add_argument("--calibration", help="preset=plus builds: a file of text that is not the benchmarks' domain "
                                              "(never test data), e.g. a toy's data/train.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    runner = Runner(settings_from_args(args))
    if args.command == "table":
        table(runner)
        print((runner.out / "table.md").read_text())
    else:
        for name in args.which.split(","):
            print(ablations.run(runner, name))


if __name__ == "__main__":
    main()
