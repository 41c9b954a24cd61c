"""Every kNN-MoE option, its default and its validation, in one place.

`hf-knnmoe` model_args are split here into ours and lm-eval's `hf` ones; ours become one frozen options object
that is validated once at load time and passed whole. Field metadata carries the help text (as peft configs do).
A preset (`preset=plus`) only fills in the options not given explicitly: build options through `resolve` (as
`split_model_args` and `attach` do), never `KnnMoeOptions(preset=...)` directly, which would not apply it.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from ..errors import KnnMoeError
from .mixing import SIMILARITIES

Mode = Literal["eval", "build"]


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


_CHOICES = {  # options that take one of a few words
    "loss": ("sum", "mean"),
    "grad": ("paper", "dense"),
    "optimizer": ("sgd", "adam"),
    "confidence": ("kernel", "radius"),
    "free": ("all", "kept"),
    "keys": ("stock", "mixed"),
    "positions": ("answer", "all"),
}


@dataclass(frozen=True)
class KnnMoeOptions:
    preset: str = _help("paper: the paper's method | plus: our recipe (docs/plus.md). Sets the defaults of the options it names; an option given explicitly wins", default="paper")
    memory: str | None = _help("memory directory: read in eval mode, written in build mode", default=None)
    mode: str = _help("eval: route with the memory; build: teacher-force the task's gold answers into a memory", default="eval")
    # retrieval and mixing
    k: int = _help("neighbours retrieved per token and layer (paper default 1)", default=1)
    similarity: str = _help("rbf | rbf_l2 (rbf on L2-normalised vectors) | cosine", default="rbf")
    sigma: float | None = _help("RBF bandwidth; None/auto: 2*sigma^2 = the memory's mean squared NN distance", default=None)
    max_distance: float | None = _help("lambda = 0 for neighbours farther than this (off by default)", default=None)
    confidence: str = _help("kernel: lambda = mean similarity (the paper) | radius: lambda = share of the k neighbours within the layer's calibrated radius (needs a memory built with radius_quantile; beyond the paper)", default="kernel")
    index: str = _help("exact (fp16 keys, exact search: the paper's default) | ivfpq (the paper's kNN-MoE (IVFPQ): PCA d/8, IVF, 8-bit scalar codes, nprobe 32, no re-ranking) | ivfpq_rerank (ours: PCA d/8, IVF, 32-byte PQ codes, nprobe 8, candidates re-ranked on the fp16 keys; faster on a CPU) | hnsw (re-ranked) | a faiss factory string (re-ranked); docs/retrieval.md", default="exact")
    nprobe: int | None = _help("IVF lists searched per query; None/auto: the index's own (ivfpq 32 as the paper, ivfpq_rerank and factory strings 8)", default=None)
    verify: bool = _help("check every memory file's sha256 when loading", default=True)
    diagnostics: str | None = _help("also write per-layer lambda / top-k change statistics to this JSON file", default=None)
    # Selective (paper Table 3): retrieval off where the stock model already finds the request's context likely
    selective_ppl: float | None = _help("retrieval off for requests whose context the stock model gives a perplexity below this", default=None)
    selective_fraction: float | None = _help("retrieval off for this fraction of each task's documents, those of lowest stock context perplexity (a first pass over the task's requests; per rank under data parallelism)", default=None)
    # building
    eta: float = _help("step size of the gradient step(s) on the router logits (the paper's value is lost from its text; 100 chosen on the toy, docs/paper-vs-package.md)", default=100.0)
    steps: int = _help("gradient steps T on the logit offsets (paper default 1)", default=1)
    loss: str = _help("sum: the NLL of every scored token, summed (Eq. 2; exact for one-token answers) | mean: each sequence's mean (steps shrink with the answer's length)", default="sum")
    grad: str = _help("paper: the router's own gradient; dense: straight-through dense mixture of all experts under the family's gating rule (beyond the paper)", default="paper")
    optimizer: str = _help("sgd (the paper's plain steps) | adam (beyond the paper; for steps > 1)", default="sgd")
    free: str = _help("all: every position's logits are leaves (the paper) | kept: only the stored positions' logits move, so a value does not count on routing changes elsewhere that retrieval will not make (beyond the paper)", default="all")
    keys: str = _help("stock: keys are router inputs under stock routing (the paper) | mixed: re-read after the steps with the stored positions routed by their values, as retrieval will route them (beyond the paper)", default="stock")
    radius_quantile: float | None = _help("build: store each layer's confidence radius, radius_scale x this quantile of the keys' leave-one-out nearest-neighbour distances (off by default)", default=None)
    radius_scale: float = _help("build: the radius as a multiple of that quantile", default=1.0)
    calibration: str | None = _help("build: a file of text that is NOT the memory's domain (one text per line, or JSONL with a 'text' field; never test data): each layer's radius stays below the calibration_quantile of its tokens' distances to the nearest key", default=None)
    calibration_quantile: float = _help("build: see calibration", default=0.001)
    positions: str = _help("answer: positions whose next token is in the gold continuation | all: every position after the first, each scored on its own next token (the paper's every time step)", default="answer")
    shard_tokens: int = _help("build: flush a shard to disk every this many stored positions (resume granularity)", default=50_000)
    labels: str | None = _help("build: teacher-force the answers of this labels file (python -m knnmoe_eval.harness.labels) instead of gold", default=None)

    def __post_init__(self):
        def bad(name, why):
            raise KnnMoeError(f"model_arg {name}={getattr(self, name)!r}: {why}")

        if self.preset not in PRESETS:
            bad("preset", f"choose one of {', '.join(PRESETS)}")
        if self.mode not in get_args(Mode):
            bad("mode", "choose eval or build")
        if self.memory is None:
            bad("memory", "kNN-MoE needs memory=DIR (the memory to read, or in mode=build the one to write)")
        if os.path.isfile(self.memory):
            bad("memory", "this is a file, not a memory directory; pass the directory that holds manifest.json "
                "(or, in mode=build, a new directory)")
        for name, words in _CHOICES.items():
            if getattr(self, name) not in words:
                bad(name, f"choose {' or '.join(words)}")
        if not (isinstance(self.k, int) and self.k >= 1):
            bad("k", "must be an integer >= 1")
        if self.similarity not in SIMILARITIES:
            bad("similarity", f"choose one of {', '.join(SIMILARITIES)}")
        if self.sigma is not None and not (math.isfinite(self.sigma) and self.sigma > 0):
            bad("sigma", "must be a positive number, or auto")
        if self.max_distance is not None and not (math.isfinite(self.max_distance) and self.max_distance > 0):
            bad("max_distance", "must be a positive number")
        if self.nprobe is not None and not (isinstance(self.nprobe, int) and self.nprobe >= 1):
            bad("nprobe", "must be an integer >= 1, or auto")
        if not (math.isfinite(self.eta) and self.eta > 0):
            bad("eta", "must be a finite number > 0")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            bad("steps", "must be an integer >= 1")
        if self.radius_quantile is not None and not (0 < self.radius_quantile <= 1):
            bad("radius_quantile", "must be in (0, 1]")
        if not (math.isfinite(self.radius_scale) and self.radius_scale > 0):
            bad("radius_scale", "must be a finite number > 0")
        if self.calibration is not None and self.mode != "build":
            bad("calibration", "calibration text is read by mode=build only; the memory stores the radii it set")
        if self.calibration is not None and self.radius_quantile is None:
            bad("calibration", "calibration caps the confidence radius: give radius_quantile too (preset=plus does)")
        if self.calibration is not None and not os.path.isfile(self.calibration):
            bad("calibration", "no such file")
        if not 0 <= self.calibration_quantile < 1:
            bad("calibration_quantile", "must be in [0, 1)")
        if not (isinstance(self.shard_tokens, int) and self.shard_tokens >= 1):
            bad("shard_tokens", "must be an integer >= 1")
        if self.selective_ppl is not None and not (math.isfinite(self.selective_ppl) and self.selective_ppl > 0):
            bad("selective_ppl", "must be a positive perplexity")
        if self.selective_fraction is not None and not 0 <= self.selective_fraction <= 1:
            bad("selective_fraction", "must lie in [0, 1]")
        if self.selective_ppl is not None and self.selective_fraction is not None:
            bad("selective_fraction", "give selective_ppl (an absolute threshold) or selective_fraction, not both")
        if self.labels is not None and self.mode != "build":
            bad("labels", "labels are read by mode=build only; drop labels= to evaluate with a memory")
        if self.labels is not None and not os.path.isfile(self.labels):
            bad("labels", "no such file; write one with python -m knnmoe_eval.harness.labels")


OPTION_NAMES = tuple(f.name for f in fields(KnnMoeOptions))
BUILD_FIELDS = ("preset", "eta", "steps", "loss", "grad", "optimizer", "positions", "free", "keys", "radius_quantile",
                "radius_scale")

# What each preset sets; everything it does not name keeps the field's default (the paper's). Measured effects of
# each plus ingredient: docs/plus.md.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "plus": {
        # values: the dense straight-through gradient, 5 Adam steps of 5, only the stored positions' logits free,
        # keys read under the routing the values will produce
        "grad": "dense", "optimizer": "adam", "eta": 5.0, "steps": 5, "free": "kept", "keys": "mixed",
        # confidence: lambda = 1 within twice the 99th percentile of the memory's own neighbour distances, kept
        # clear of the calibration text's tokens when the user names some
        "radius_quantile": 0.99, "radius_scale": 2.0, "confidence": "radius",
    },
}
# ... and what a preset sets instead when the build names no calibration text: nothing since the layers must agree
# (mixing.agree_with_earlier), which keeps every toy's in-domain tokens out without the cap (docs/plus.md)
UNCALIBRATED: dict[str, dict[str, Any]] = {"plus": {}}


def default(name: str, preset: str = "paper") -> Any:
    """The default of option `name` under `preset`: the runner, the demo and the docs read it from here."""
    if name in PRESETS.get(preset, {}):
        return PRESETS[preset][name]
    return next(f.default for f in fields(KnnMoeOptions) if f.name == name)


def resolve(given: dict) -> KnnMoeOptions:
    """Options from what the user gave: the preset's values fill in every option not given explicitly."""
    preset = given.get("preset", "paper")
    if preset not in PRESETS:
        raise KnnMoeError(f"model_arg preset={preset!r}: choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **given}
    if values.get("calibration") is None:
        values = {**values, **UNCALIBRATED.get(preset, {}), **given}
    return KnnMoeOptions(**values)


def _coerce(name: str, value: Any) -> Any:
    """lm-eval parses model_args itself ("1" -> 1, "True" -> True); finish the job for our fields."""
    if name in ("sigma", "max_distance", "diagnostics", "memory", "labels", "nprobe", "selective_ppl",
                "selective_fraction", "radius_quantile", "calibration") and value in (None, "auto", "none", "None", ""):
        return None
    if name in ("k", "steps", "nprobe", "shard_tokens"):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    if name in ("sigma", "max_distance", "eta", "selective_ppl", "selective_fraction", "radius_quantile", "radius_scale",
                "calibration_quantile") and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            raise KnnMoeError(f"model_arg {name}={value!r} is not a number") from None
    if name == "verify" and isinstance(value, str):
        return value.lower() not in ("false", "0", "no")
    return str(value) if name in ("memory", "diagnostics", "index", "labels", "preset", "calibration") else value


def split_model_args(kwargs: dict, passthrough: set[str]) -> tuple[KnnMoeOptions, dict]:
    """Our options and the rest. `passthrough` are the names `hf` itself accepts; anything else that looks like a
    misspelling of one of ours is refused instead of being forwarded to `from_pretrained`."""
    ours = {k: _coerce(k, v) for k, v in kwargs.items() if k in OPTION_NAMES}
    rest = {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}
    for name in rest:
        if name in passthrough:
            continue
        close = difflib.get_close_matches(name, OPTION_NAMES, n=1, cutoff=0.75)
        if close:
            raise KnnMoeError(
                f"unknown model_arg {name!r}; did you mean {close[0]!r}? kNN-MoE options: {', '.join(OPTION_NAMES)}"
            )
    return resolve(ours), rest
