"""Every kNN-MoE option, its default and its validation, in one place.

`hf-knnmoe` model_args are split here into ours and lm-eval's `hf` ones; ours become one frozen options object
that is validated once at load time and passed whole. Field metadata carries the help text (as peft configs do).
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from .errors import KnnMoeError
from .mixing import SIMILARITIES

Mode = Literal["eval", "build"]


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class KnnMoeOptions:
    memory: str | None = _help("memory directory: read in eval mode, written in build mode", default=None)
    mode: str = _help("eval: route with the memory; build: teacher-force the task's gold answers into a memory", default="eval")
    # retrieval and mixing
    k: int = _help("neighbours retrieved per token and layer (paper default 1)", default=1)
    similarity: str = _help("rbf | rbf_l2 (rbf on L2-normalised vectors) | cosine", default="rbf")
    sigma: float | None = _help("RBF bandwidth; None/auto: 2*sigma^2 = the memory's mean squared NN distance", default=None)
    max_distance: float | None = _help("lambda = 0 for neighbours farther than this (off by default)", default=None)
    index: str = _help("exact (fp16 keys, exact search, as the paper) | ivfpq (PCA d/8, IVF, 8-bit PQ, re-ranked) | hnsw | a faiss factory string", default="exact")
    nprobe: int = _help("IVF lists searched per query (ivf indexes only; the paper used 32, which found the same neighbours as 8 at about twice the cost, docs/retrieval.md)", default=8)
    verify: bool = _help("check every memory file's sha256 when loading", default=True)
    diagnostics: str | None = _help("also write per-layer lambda / top-k change statistics to this JSON file", default=None)
    # building
    eta: float = _help("step size of the gradient step(s) on the router logits", default=10.0)
    steps: int = _help("gradient steps T on the logit offsets (paper default 1)", default=1)
    grad: str = _help("paper: the router's own gradient; dense: straight-through dense-softmax gradient (beyond the paper)", default="paper")
    optimizer: str = _help("sgd (the paper's plain steps) | adam (beyond the paper; for steps > 1)", default="sgd")
    positions: str = _help("answer: positions whose next token is in the gold continuation | all: every scored-context position too", default="answer")
    shard_tokens: int = _help("build: flush a shard to disk every this many stored positions (resume granularity)", default=50_000)
    labels: str | None = _help("build: teacher-force the answers of this labels file (python -m knnmoe_eval.labels) instead of gold", default=None)

    def __post_init__(self):
        def bad(name, why):
            raise KnnMoeError(f"model_arg {name}={getattr(self, name)!r}: {why}")

        if self.mode not in get_args(Mode):
            bad("mode", "choose eval or build")
        if self.memory is None:
            bad("memory", "kNN-MoE needs memory=DIR (the memory to read, or in mode=build the one to write)")
        if not (isinstance(self.k, int) and self.k >= 1):
            bad("k", "must be an integer >= 1")
        if self.similarity not in SIMILARITIES:
            bad("similarity", f"choose one of {', '.join(SIMILARITIES)}")
        if self.sigma is not None and not (math.isfinite(self.sigma) and self.sigma > 0):
            bad("sigma", "must be a positive number, or auto")
        if self.max_distance is not None and not (math.isfinite(self.max_distance) and self.max_distance > 0):
            bad("max_distance", "must be a positive number")
        if not (isinstance(self.nprobe, int) and self.nprobe >= 1):
            bad("nprobe", "must be an integer >= 1")
        if not (math.isfinite(self.eta) and self.eta > 0):
            bad("eta", "must be a finite number > 0")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            bad("steps", "must be an integer >= 1")
        if self.grad not in ("paper", "dense"):
            bad("grad", "choose paper or dense")
        if self.optimizer not in ("sgd", "adam"):
            bad("optimizer", "choose sgd or adam")
        if self.positions not in ("answer", "all"):
            bad("positions", "choose answer or all")
        if not (isinstance(self.shard_tokens, int) and self.shard_tokens >= 1):
            bad("shard_tokens", "must be an integer >= 1")
        if self.labels is not None and self.mode != "build":
            bad("labels", "labels are read by mode=build only; drop labels= to evaluate with a memory")
        if self.labels is not None and not os.path.isfile(self.labels):
            bad("labels", "no such file; write one with python -m knnmoe_eval.labels")

    @property
    def build_settings(self) -> dict:
        """What a built memory records about how it was built (labels: null = gold answers)."""
        from .labels import describe

        settings = {n: getattr(self, n) for n in ("eta", "steps", "grad", "optimizer", "positions")}
        return {**settings, "labels": None if self.labels is None else describe(self.labels)}


OPTION_NAMES = tuple(f.name for f in fields(KnnMoeOptions))


def _coerce(name: str, value: Any) -> Any:
    """lm-eval parses model_args itself ("1" -> 1, "True" -> True); finish the job for our fields."""
    if name in ("sigma", "max_distance", "diagnostics", "memory", "labels") and value in (None, "auto", "none", "None", ""):
        return None
    if name in ("k", "steps", "nprobe", "shard_tokens"):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    if name in ("sigma", "max_distance", "eta") and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            raise KnnMoeError(f"model_arg {name}={value!r} is not a number") from None
    if name == "verify" and isinstance(value, str):
        return value.lower() not in ("false", "0", "no")
    return str(value) if name in ("memory", "diagnostics", "index", "labels") else value


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
    return KnnMoeOptions(**ours), rest
