"""The paper's experiments in one command: every method on every benchmark, Table 1 with significance, ablations.

    python -m knnmoe_eval.experiments table  --pretrained toy --benchmarks toy_shift,toy_indomain
    python -m knnmoe_eval.experiments ablate --pretrained toy --benchmarks toy_shift --which n,k,steps
    python -m knnmoe_eval.experiments table  --pretrained allenai/OLMoE-1B-7B-0125-Instruct \\
        --benchmarks gpqa,medqa,medmcqa,mmlu,supergpqa,mbpp --allow_code_execution

Scoring is the paper's by default (`--scoring gen`: generation, then the same answer parsing for every method);
`--scoring loglik` (multiple-choice loglikelihood) is ours, cheaper and free of parsing. The toy benchmarks have
no generative task (their answer is one byte-level character after a 64-position context: multiple choice by
loglikelihood is the toy's protocol), so they are scored by loglikelihood under either setting, and the table says so.

Every run goes through lm-eval (`simple_evaluate` with `hf`, `hf` + `peft=`, or `hf-knnmoe`) with samples logged,
so every method is scored per test item by the same task and the same answer parsing, and any two methods can be
compared item by item (paired bootstrap, perplexity buckets, Selective). Each piece (memory, adapter, per-item
scores) is written under `--out` as it finishes and reused when the command runs again with the same settings;
changed settings recompute only the pieces they affect.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..benchmarks.data import BENCHMARK_SPLITS
from ..core.files import write_json_atomic
from ..core.options import PRESETS, default, option
from ..errors import KnnMoeError
from .significance import paired_bootstrap

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"
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
    loglik_only: bool = False  # the toys: multiple choice by loglikelihood is their protocol (no generative task)

    def scoring(self, requested: str) -> str:
        """The scoring this benchmark runs under: the requested one, except for a loglik-only benchmark (the toys)."""
        return "loglik" if self.loglik_only else requested

    def runs_fewshot(self, scoring: str) -> bool:
        """Whether the 5-shot row runs: it is generative, so only under gen scoring, where the benchmark has one."""
        return self.scoring(scoring) == "gen" and self.fewshot is not None

    def test_task(self, scoring: str) -> str:
        scoring = self.scoring(scoring)
        task = self.gen if scoring == "gen" else self.test
        if task is None:
            raise KnnMoeError(f"benchmark {self.name} has no {scoring} test task; use --scoring "
                              f"{'loglik' if scoring == 'gen' else 'gen'}")
        return task


def _paper(name: str, mc: bool = True) -> Benchmark:
    return Benchmark(name, ref=f"knnmoe_{name}_ref", test=f"knnmoe_{name}" if mc else None, gen=f"knnmoe_{name}_gen",
                     fewshot=f"knnmoe_{name}_5shot", ref_mc=f"knnmoe_{name}_ref_mc" if mc else None)


BENCHMARKS = {
    **{name: _paper(name, split.multiple_choice) for name, split in BENCHMARK_SPLITS.items()},
    # The toy's context window (64 positions) cannot hold five examples, so it has no 5-shot task; its answer is one
    # character scored by loglikelihood (toy.py), so it has no generative task either.
    "toy_shift": Benchmark("toy_shift", ref="knnmoe_toy_shift_ref", test="knnmoe_toy_shift",
                           ref_mc="knnmoe_toy_shift_ref_mc", loglik_only=True),
    "toy_indomain": Benchmark("toy_indomain", ref="knnmoe_toy_indomain_ref", test="knnmoe_toy_indomain",
                              ref_mc="knnmoe_toy_indomain_ref_mc", loglik_only=True),
}


# Every method the table can run: its --methods name, its row in the table, and one line of --help. In the paper's
# order; TABLE1 are the rows of the paper's Table 1, the default.
METHODS = {
    "zero-shot": ("Zero-shot", "the stock model (always run: every † is against it)"),
    "5-shot": ("5-shot (similar)", "the 5 most similar references in the prompt (generative scoring only)"),
    "lora": ("LoRA SFT", "LoRA on every linear layer, trained on the references (Table 15)"),
    "router": ("Router-only SFT", "only the routers trained on the references"),
    "knn": ("kNN-MoE", "the memory, exact search (the paper's naive kNN-MoE)"),
    "knn-ivfpq": ("kNN-MoE (IVFPQ)", "the same memory under index=ivfpq (PCA d/8, IVF, 8-bit codes, nprobe 32)"),
    "knn-selective": ("kNN-MoE (Selective)", "retrieval off for the lowest-perplexity third (Table 3)"),
    "knn-dense": ("kNN-MoE (grad=dense)", "a memory built with the dense-mixture gradient (ours)"),
    "knn-plus": ("kNN-MoE (plus)", "preset=plus, our recipe (docs/plus.md)"),
    "c3po": ("C3PO", "per-item test-time routing optimisation (Table 10; costly on large test sets)"),
}
TABLE1 = ("zero-shot", "5-shot", "lora", "router", "knn", "knn-ivfpq")


@dataclass(frozen=True)
class Settings:
    pretrained: str = option("model path or hub id; 'toy' trains (or loads) the toy MoE", None, required=True)
    out: str = option("where memories, adapters, per-item scores and tables are written", "results/experiments")
    benchmarks: tuple[str, ...] = option("benchmarks, comma-separated", ("toy_shift",))
    methods: tuple[str, ...] = option("table: which methods run, comma-separated, or 'all' (each listed below); "
                                    "the default is the paper's Table 1", TABLE1)
    scoring: str = option("gen: generation + the same answer parsing for every method (the paper's); loglik: "
                        "multiple-choice loglikelihood (ours). The toys are loglik under both", "gen",
                        choices=("gen", "loglik"))
    limit: int | None = option("test items per benchmark", None)
    ref_limit: int | None = option("references per benchmark (N); default: the benchmark's reference set", None)
    include_path: str = option("lm-eval --include_path of the tasks", str(TASKS_DIR))
    metadata: dict = option('JSON passed to the tasks, e.g. \'{"data_dir": "..."}\'', {})
    device: str = option("lm-eval device", "cpu")
    dtype: str = option("model dtype", "auto")
    batch_size: int = option("lm-eval batch size of every run", 32)
    parallelize: bool = option("shard a model too large for one GPU over all visible GPUs (hf's parallelize)", False)
    # the build's defaults are hf-knnmoe's (options.py), never restated here
    eta: float = option(f"build step size (hf-knnmoe's default {default('eta'):g})", default("eta"))
    k: int | None = option("neighbours per token and layer; default: each row's preset's own (paper "
                           f"{default('k')}, plus {default('k', 'plus')})", None)
    steps: int = option("build gradient steps T", default("steps"))
    apply_chat_template: bool | str = option("as lm_eval's: format every method's prompts (runs, builds, SFT "
                                           "data) with the model's chat template (or the named one)", False, nargs="?")
    system_instruction: str | None = option("as lm_eval's, for every method", None)
    fewshot_as_multiturn: bool = option("as lm_eval's, for every method", False)
    sft_epochs: int = option("SFT epochs (the paper's count is lost)", 3)
    sft_batch_size: int = option("SFT batch size (the paper's Table 15)", 16)
    lora_r: int = option("LoRA rank, alpha = r (the paper's Table 15)", 32)
    lora_lr: float | None = option("LoRA SFT learning rate (default sft.DEFAULT_LR; toy: 3e-3)", None)
    router_lr: float | None = option("router-only SFT learning rate (default sft.DEFAULT_LR; toy: 3e-2)", None)
    selective_fraction: float = option("Selective: share of lowest-perplexity test items without retrieval", 1 / 3)
    bootstrap: int = option("paired bootstrap resamples", 1000)
    seed: int = option("seed of lm-eval, SFT and the bootstrap", 0)
    allow_code_execution: bool = option("run MBPP's generated code (also needs HF_ALLOW_CODE_EVAL=1)", False)
    gen_kwargs: str | None = option("override the generative tasks' generation settings, e.g. max_gen_toks=64", None)
    judge: str | None = option("unlabelled ablation's labeller: knn-dense, or an lm-eval model spec MODEL:ARGS", None)
    cache: str = option("where the toy model is cached", ".cache")
    seeds: tuple[int, ...] = option("seeds ablation: SFT training seeds (paper Appendix D)", (0, 1, 2))
    calibration: str | None = option("preset=plus builds: a file of text that is not the benchmarks' domain "
                                         "(never test data), e.g. a toy's data/train.jsonl; docs/plus.md", None)
    # ablation grids (paper §6; values its text export lost are marked in docs/experiments.md)
    n_values: tuple[int | None, ...] = option("N ablation grid; 'all' = the whole reference set",
                                              (0, 1_000, 10_000, None))
    k_values: tuple[int, ...] = option("k ablation grid", (1, 2, 4, 8))
    step_values: tuple[int, ...] = option("T ablation grid", (1, 2, 4))
    similarities: tuple[str, ...] = option("similarity ablation grid", ("rbf", "rbf_l2", "cosine"))

    def __post_init__(self):
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise KnnMoeError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
        if self.scoring not in ("loglik", "gen"):
            raise KnnMoeError(f"--scoring {self.scoring!r}: choose loglik or gen")
        if tuple(self.methods) in (("all",), (None,)):  # the command line reads 'all' in a list as None (n_values)
            object.__setattr__(self, "methods", tuple(METHODS))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise KnnMoeError(f"unknown method(s) {unknown} in --methods; choose from {', '.join(METHODS)}, or all")
        if "zero-shot" not in self.methods:  # every significance mark and every Δ is against zero-shot
            object.__setattr__(self, "methods", ("zero-shot", *self.methods))
        object.__setattr__(self, "methods", tuple(m for m in METHODS if m in self.methods))  # the paper's order


class Runner:
    """Builds, trains and evaluates what a table or an ablation asks for, reusing whatever is already on disk."""

    def __init__(self, settings: Settings):
        import lm_eval.tasks

        self.settings = settings
        self.out = Path(settings.out)
        self.pretrained = settings.pretrained
        metadata = dict(settings.metadata)
        from .toy import is_toy_dir, train_or_load

        if self.pretrained == "toy":
            self.pretrained = str(train_or_load(settings.cache))
        if is_toy_dir(self.pretrained):
            metadata.setdefault("toy_dir", self.pretrained)
        if settings.ref_limit is not None:  # one reference set for every method: the 5-shot pool is cut to it too
            if int(metadata.setdefault("ref_size", settings.ref_limit)) != settings.ref_limit:
                raise KnnMoeError(f"--ref_limit {settings.ref_limit} and --metadata ref_size={metadata['ref_size']} "
                                  "name two reference sets; give one of them")
        self.metadata = metadata
        # every benchmark is one of ours: lm-eval's own task index would only cost seconds per run
        self.task_manager = lm_eval.tasks.TaskManager(include_path=settings.include_path, include_defaults=False,
                                                      metadata=metadata)
        self._base = None

    @property
    def prompt_format(self) -> dict:
        """lm-eval's prompt-formatting arguments, as `simple_evaluate` takes them."""
        return {"apply_chat_template": self.settings.apply_chat_template, "system_instruction": self.settings.system_instruction,
                "fewshot_as_multiturn": self.settings.fewshot_as_multiturn}

    # -- models --------------------------------------------------------------------------------------------------
    @property
    def base(self):
        """The stock model, loaded once and shared by every run that does not change its weights."""
        if self._base is None:
            from lm_eval.models.huggingface import HFLM

            self._base = HFLM(pretrained=self.pretrained, device=self.settings.device, dtype=self.settings.dtype,
                              batch_size=self.settings.batch_size, parallelize=self.settings.parallelize)
        return self._base

    def knn_lm(self, memory: Path, **options):
        from ..harness.lm import KnnMoeLM

        return KnnMoeLM(pretrained=self.base.model, tokenizer=self.base.tokenizer, batch_size=self.settings.batch_size,
                        memory=str(memory), **options)

    def peft_lm(self, adapter: Path):
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=self.pretrained, peft=str(adapter), device=self.settings.device, dtype=self.settings.dtype,
                    batch_size=self.settings.batch_size, parallelize=self.settings.parallelize)

    def c3po_lm(self, references: Path, **options):
        from .c3po import C3POLM

        return C3POLM(pretrained=self.pretrained, device=self.settings.device, dtype=self.settings.dtype,
                      batch_size=self.settings.batch_size, parallelize=self.settings.parallelize, references=str(references),
                      **options)

    def judge_lm(self, bench: Benchmark):
        """The judge that labels references in the unlabelled ablation: `knn-dense` is this model with its
        gold-built dense-gradient memory; anything else is an lm-eval model spec `MODEL:ARGS`."""
        if self.settings.judge == "knn-dense":
            return self.knn_lm(self.memory(bench, **DENSE), k=self.k())
        from lm_eval.api.registry import get_model

        model, _, args = self.settings.judge.partition(":")
        return get_model(model).create_from_arg_string(args, {"batch_size": self.settings.batch_size, "device": self.settings.device})

    # -- pieces on disk ------------------------------------------------------------------------------------------
    def _evaluate(self, lm, task: str, limit: int | None) -> dict:
        import lm_eval

        return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=self.task_manager, limit=limit,
                                       log_samples=True, gen_kwargs=self.settings.gen_kwargs, bootstrap_iters=0,
                                       confirm_run_unsafe_code=self.settings.allow_code_execution,
                                       **self.prompt_format,
                                       random_seed=self.settings.seed, numpy_random_seed=self.settings.seed,
                                       torch_random_seed=self.settings.seed, fewshot_random_seed=self.settings.seed)

    def memory(self, bench: Benchmark, *, n: int | None = None, **build) -> Path:
        """The kNN-MoE memory of `bench` built from its first `n` references (all by default) through lm-eval."""
        if build.get("preset", "paper") == "paper":  # the runner's η and T are the paper rows'; a preset has its own
            build = {"eta": self.settings.eta, "steps": self.settings.steps, "grad": "paper", **build}
        elif self.settings.calibration:
            build = {"calibration": self.settings.calibration, **build}
        n = self.settings.ref_limit if n is None else n
        name = "-".join([bench.name, f"n{n if n is not None else 'all'}"] +
                        [f"{k}{Path(str(v)).stem if k in ('labels', 'calibration') else v}"
                         for k, v in sorted(build.items()) if v is not None] +
                        (["chat"] if self.settings.apply_chat_template else []))
        path = self.out / "memories" / name
        if not (path / "manifest.json").exists():
            lm = self.knn_lm(path, mode="build", **build)
            self._evaluate(lm, bench.ref, limit=n)
            # the build pass alone (model loading and lm-eval's request set-up excluded), as SFT's training time
            write_json_atomic(self.out / "memories" / f"{name}.build.json",
                              {"wall_s": lm.builder.wall_s, "references": n, **build})
        return path

    def c3po_references(self, bench: Benchmark) -> Path:
        """Which of `bench`'s first N references the stock model answers (C3PO's successful neighbours)."""
        path = self.out / "c3po" / f"{bench.name}-n{self.settings.ref_limit or 'all'}.json"
        if not path.exists():
            lm = self.c3po_lm(path, mode="build")
            start = time.perf_counter()
            self._evaluate(lm, bench.ref, limit=self.settings.ref_limit)
            write_json_atomic(path.with_suffix(".build.json"), {"wall_s": time.perf_counter() - start,
                                                                "references": self.settings.ref_limit})
        return path

    def adapter(self, bench: Benchmark, method: str, seed: int | None = None) -> Path:
        """A LoRA or router-only SFT adapter trained on `bench`'s references (see `sft.py`), by default with --seed."""
        from .sft import SftSettings, train_sft

        seed = self.settings.seed if seed is None else seed
        lr = self.settings.lora_lr if method == "lora" else self.settings.router_lr
        rank = f"-r{self.settings.lora_r}" if method == "lora" else ""
        chat = "-chat" if self.settings.apply_chat_template else ""
        path = self.out / "adapters" / (f"{bench.name}-{method}-n{self.settings.ref_limit or 'all'}-lr{lr or 'default'}"
                                        f"-e{self.settings.sft_epochs}-b{self.settings.sft_batch_size}{rank}{chat}-s{seed}")
        dtype = "float32" if self.settings.dtype == "auto" else self.settings.dtype
        train_sft(SftSettings(self.pretrained, (bench.ref,), method, include_path=self.settings.include_path,
                              metadata=self.metadata, limit=self.settings.ref_limit, seed=seed,
                              epochs=self.settings.sft_epochs, lr=lr, batch_size=self.settings.sft_batch_size,
                              lora_r=self.settings.lora_r, device=self.settings.device, dtype=dtype,
                              prompt=self.prompt_format), path)
        return path

    def scores(self, run: str, bench: Benchmark, make_lm, task: str | None = None, config: dict | None = None) -> dict:
        """Per-item scores of one method on one benchmark's test task, cached as JSON under runs/<run>/."""
        task = task or bench.test_task(self.settings.scoring)
        config = {"task": task, "limit": self.settings.limit, "gen_kwargs": self.settings.gen_kwargs, **self.prompt_format,
                  **(config or {})}
        path = self.out / "runs" / run / f"{bench.name}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            if cached["config"] == config:
                return cached
        lm = make_lm()
        start = time.perf_counter()
        result = self._evaluate(lm, task, self.settings.limit)
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
            "selective_skipped": result["config"].get("knnmoe", {}).get("selective_skipped"),
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
        from ..harness.selective import context_perplexity

        ppl = [float(p) for p in context_perplexity(self.base, zero["contexts"])]
        write_json_atomic(path, {"doc_ids": zero["doc_ids"], "ppl": ppl})
        return np.array(ppl)

    def load_balance(self, run: str, bench: Benchmark, make_lm, config: dict | None = None) -> np.ndarray:
        """The family's load-balancing loss of each test item's prompt under a method's routing (Table 11), cached
        as runs/<run>/<bench>.balance.json. kNN-MoE's logits are read after its mixing (`balance.py`)."""
        from ..core.routers import find_routers
        from .balance import load_balance

        contexts = self.zero_shot(bench)["contexts"]
        path = self.out / "runs" / run / f"{bench.name}.balance.json"
        cached = json.loads(path.read_text()) if path.exists() else None
        if cached is not None and cached["contexts"] == contexts and cached["config"] == (config or {}):
            return np.array(cached["loss"])
        lm = make_lm()
        sequences = [lm.tok_encode(c)[-lm.max_length:] for c in contexts]
        loss = load_balance(lm.model, find_routers(lm.model), sequences, getattr(lm, "retriever", None))
        write_json_atomic(path, {"config": config or {}, "contexts": contexts, "loss": loss})
        return np.array(loss)

    def k(self, preset: str = "paper") -> int:
        """--k where given, else the preset's own: the plus rows are the recipe, k included."""
        return self.settings.k if self.settings.k is not None else default("k", preset)

    # -- methods -------------------------------------------------------------------------------------------------
    def zero_shot(self, bench: Benchmark) -> dict:
        return self.scores("zero-shot", bench, lambda: self.base)

    def knn(self, bench: Benchmark, run: str = "knn", *, n: int | None = None, build: dict | None = None,
            **options) -> dict:
        if n == 0:  # N = 0 is the stock model: an empty reference set
            return self.zero_shot(bench)
        options = {"k": self.k(options.get("preset", "paper")), **options}
        memory = self.memory(bench, n=n, **(build or {}))
        return self.scores(run, bench, lambda: self.knn_lm(memory, **options),
                           config={"memory": memory.name, **options})

    def knn_ivfpq(self, bench: Benchmark) -> dict:
        return self.knn(bench, "knn-ivfpq", index="ivfpq")

    def knn_plus(self, bench: Benchmark) -> dict:
        return self.knn(bench, "knn-plus", build=PLUS, **PLUS)

    def knn_dense(self, bench: Benchmark) -> dict:
        return self.knn(bench, "knn-dense", build=DENSE)

    def selective(self, bench: Benchmark) -> dict:
        """kNN-MoE with retrieval off for the lowest-perplexity third of the test items (paper Table 3): the
        `selective_fraction` option of hf-knnmoe, which scores every context under the stock model first."""
        return self.knn(bench, "knn-selective", selective_fraction=self.settings.selective_fraction)

    def c3po(self, bench: Benchmark) -> dict:
        """C3PO (the paper's Table 10): per-input NGD toward the successful references (`c3po.py`); its sentence
        encoder is the 5-shot row's ($KNNMOE_FEWSHOT_ENCODER)."""
        from ..benchmarks.fewshot import ENCODER_ENV

        references = self.c3po_references(bench)
        return self.scores("c3po", bench, lambda: self.c3po_lm(references),
                           config={"references": references.name, "encoder": os.environ.get(ENCODER_ENV)})

    def methods(self, bench: Benchmark) -> dict[str, dict]:
        """The table's rows for one benchmark (`--methods`, in the paper's order). 5-shot runs only under
        generative scoring, where the benchmark has a 5-shot task. A method that cannot run here (e.g. IVFPQ on a
        memory too small to train it) gets {"error": why}, which the table prints under itself."""
        run = {"zero-shot": lambda: self.zero_shot(bench), "5-shot": lambda: self.five_shot(bench),
               "lora": lambda: self.sft(bench, "lora"), "router": lambda: self.sft(bench, "router"),
               "knn": lambda: self.knn(bench), "knn-ivfpq": lambda: self.knn_ivfpq(bench),
               "knn-selective": lambda: self.selective(bench), "knn-dense": lambda: self.knn_dense(bench),
               "knn-plus": lambda: self.knn_plus(bench), "c3po": lambda: self.c3po(bench)}
        methods = {METHODS[m][0]: run[m] for m in self.settings.methods
                   if m != "5-shot" or bench.runs_fewshot(self.settings.scoring)}
        rows = {}
        for name, evaluate in methods.items():
            try:
                rows[name] = evaluate()
            except KnnMoeError as e:
                if name == "Zero-shot":
                    raise
                log.error("%s on %s: %s", name, bench.name, e)
                rows[name] = {"error": str(e)}
        return rows

    def five_shot(self, bench: Benchmark) -> dict:
        """The 5 most similar references in the prompt; the record names the encoder that chose them."""
        from ..benchmarks import fewshot

        record = self.scores("5-shot", bench, lambda: self.base, task=bench.fewshot)
        if "encoder" not in record:  # a fresh run: the sampler has just chosen its encoder
            record["encoder"] = fewshot.chosen_encoder()
            write_json_atomic(self.out / "runs" / "5-shot" / f"{bench.name}.json", record)
        return record

    def sft(self, bench: Benchmark, method: str, seed: int | None = None) -> dict:
        adapter = self.adapter(bench, method, seed)
        run = f"sft-{method}" if seed in (None, self.settings.seed) else f"sft-{method}-seed{seed}"  # --seed: Table 1's
        return self.scores(run, bench, lambda: self.peft_lm(adapter), config={"adapter": adapter.name})


def table(runner: Runner) -> dict:
    """Table 1: accuracy per benchmark and on all test items together ("Avg."), † where a paired bootstrap against
    zero-shot gives p < 0.05. Writes table.md and table.json under --out and returns the JSON."""
    s = runner.settings
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
    notes = [f"kNN-MoE memories: η = {s.eta:g}, T = {s.steps}, loss = {default('loss')}, positions = "
             f"{default('positions')}; k = {s.k or default('k')}, similarity = {default('similarity')} (hf-knnmoe's defaults unless set).",
             f"kNN-MoE (plus): preset=plus ({', '.join(f'{k} = {v}' for k, v in PRESETS['plus'].items())}), "
             f"calibration text: {s.calibration or 'none'}; docs/plus.md."]
    loglik = [b for b in s.benchmarks if BENCHMARKS[b].scoring(s.scoring) == "loglik"]
    if loglik:
        notes.append(f"Scored by multiple-choice loglikelihood: {', '.join(loglik)}"
                     + (" (the toys have no generative task)" if s.scoring == "gen" else " (--scoring loglik)")
                     + "; the paper generates and parses answers.")
    no_fewshot = [b for b in s.benchmarks if "5-shot" in s.methods and not BENCHMARKS[b].runs_fewshot(s.scoring)]
    if no_fewshot:
        notes.append(f"5-shot (similar) not run on {', '.join(no_fewshot)}: it is generative, and "
                     + ("these benchmarks have no generative task." if s.scoring == "gen" else "--scoring is loglik."))
    from ..benchmarks.fewshot import QWEN3

    encoders = {per_bench[b]["5-shot (similar)"].get("encoder") for b in s.benchmarks
                if "5-shot (similar)" in per_bench[b]} - {QWEN3}
    if encoders:
        notes.append(f"5-shot (similar) chose its examples with {', '.join(map(str, sorted(encoders)))}, NOT the "
                     f"paper's {QWEN3} (not available locally).")
    result = {"settings": {**asdict(s), "pretrained": runner.pretrained}, "methods": methods,
              "scoring": {b: BENCHMARKS[b].scoring(s.scoring) for b in s.benchmarks},
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
