"""Every kNN-MoE option, its default and its validation, in one place.

`hf-knnmoe` model_args are split here into ours and lm-eval's `hf` ones; ours become one frozen options object
that is validated once at load time and passed whole. Field metadata carries the help text (as peft configs do) and
the paper's default; the README's option table is generated from them (`python -m knnmoe_eval.core.options`).

A preset is applied by construction: `KnnMoeOptions(preset="plus")` holds plus's settings, and every option given
explicitly wins over the preset. `option` and `split_model_args` also serve the other model classes' options
(hf-c3po's), so that every model_arg is parsed, coerced and refused the same way.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from functools import partial
from typing import Any, Literal, get_args

from ..errors import KnnMoeError
from .mixing import SIMILARITIES

Mode = Literal["eval", "build"]


class _Unset:
    """The value of an option nobody gave: the preset (or the paper's default) fills it in at construction."""

    def __repr__(self) -> str:
        return "<preset's>"


UNSET = _Unset()


def option(text: str, default: Any = MISSING, presets: bool = False, shown: str | None = None, **argparse: Any) -> Any:
    """A dataclass field with its help text and default, for the model_args here and the experiments' command
    line: `presets`, a preset may set it (KnnMoeOptions); `shown`, how the option table names the default (`auto`
    for a None that means "the package decides"); `argparse`, what a command line adds to the flag (choices,
    required, nargs). No default: a required field. A dict or list default is copied for each instance."""
    meta = {"help": text, "default": default, "shown": shown, "argparse": argparse}
    if presets:
        return field(default=UNSET, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_help = partial(option, presets=True)


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
    preset: str = _help("`paper`: every default below is the paper's method; `plus`: our recipe, which sets the defaults of `grad`, `optimizer`, `eta`, `steps`, `free`, `keys`, `radius_quantile`, `radius_scale`, `confidence`, `probe_tokens`, `k` (an option given explicitly wins; [docs/plus.md](docs/plus.md)). A memory records its preset, and evaluating it with another preset's build side is refused", default="paper")
    memory: str | None = _help("memory directory: read in eval mode, written in build mode. In eval mode also a Hub repo id `org/name` or `org/name/subfolder` when no local directory of that name exists ([Sharing a memory](#sharing-a-memory))", default=None)
    memory_revision: str = _help("`memory=org/name` from the Hub: the branch, tag or commit to read; the commit it resolves to is recorded in the results JSON (`config.knnmoe.memory`). Ignored for a local directory", default="main")
    mode: str = _help("`build` teacher-forces the task's gold answers into `memory`", default="eval")
    # retrieval and mixing
    k: int = _help("neighbours per token and layer (paper default)", default=1)
    similarity: str = _help("`rbf`, `rbf_l2` (RBF on L2-normalised vectors), `cosine`", default="rbf")
    sigma: float | str | None = _help("RBF bandwidth. The paper sets σ \"based on the average nearest neighbor distance\" without the formula; auto (our reading): 2σ² = the memory's mean squared nearest-neighbour distance; `mean_nn` (the other reading): σ = the mean nearest-neighbour distance, 2σ² = 2·(mean distance)²; or a number", default=None, shown="auto")
    max_distance: float | None = _help("λ = 0 beyond this distance (the exp kernel alone never reaches 0)", default=None, shown="off")
    confidence: str = _help("`kernel`: λ = mean similarity (the paper); `radius`: λ = share of the k neighbours within the layer's calibrated radius, and 0 for a token beyond its radius at an earlier MoE layer (needs a memory built with `radius_quantile`; beyond the paper)", default="kernel")
    index: str = _help("`exact` (fp16 keys, exact search: the paper's default), `ivfpq` (the paper's kNN-MoE (IVFPQ): PCA d/8, 8-bit scalar codes, nprobe 32, no re-rank), `ivfpq_rerank` (ours: 32-byte PQ codes, nprobe 8, re-ranked on the fp16 keys), `hnsw`, or a faiss factory string", default="exact")
    nprobe: int | None = _help("IVF lists searched; auto: the index's own (`ivfpq` 32 as the paper, otherwise 8)", default=None, shown="auto")
    verify: bool = _help("check every memory file's sha256 at load", default=True)
    diagnostics: str | None = _help("also write per-layer λ / top-k change statistics to this JSON file", default=None)
    # Selective (paper Table 3): retrieval off where the stock model already finds the request's context likely
    selective_ppl: float | None = _help("the paper's Selective variant: retrieval off for requests whose context the stock model gives a perplexity below this (a first stock pass)", default=None, shown="off")
    selective_fraction: float | None = _help("Selective by share: retrieval off for this fraction of each task's documents, those of lowest stock context perplexity (the paper: 0.33)", default=None, shown="off")
    # building
    eta: float = _help("build: step size on the router logits (the paper's value is lost from its text; chosen on the toy, [docs/paper-vs-package.md](docs/paper-vs-package.md))", default=100.0)
    steps: int = _help("build: gradient steps T (paper: 1)", default=1)
    loss: str = _help("build: the NLL of every scored token summed (the paper's Eq. 2, exact for one-token answers), or `mean` per sequence (an n-token answer's steps shrink n-fold)", default="sum")
    grad: str = _help("build: `paper` (the router's own gradient) or `dense` (straight-through dense mixture of all experts under the family's gating rule, [docs/families.md](docs/families.md); beyond the paper)", default="paper")
    optimizer: str = _help("build: `sgd` (paper) or `adam` (beyond the paper, for `steps` > 1)", default="sgd")
    free: str = _help("build: `all` positions' logits are leaves (the paper); `kept`: only the stored positions' logits move (beyond the paper)", default="all")
    keys: str = _help("build: keys under stock routing (the paper); `mixed`: re-read with the stored positions routed by their values (beyond the paper)", default="stock")
    radius_quantile: float | None = _help("build: store each layer's confidence radius, radius_scale x this quantile of the keys' leave-one-out nearest-neighbour distances (off by default)", default=None, shown="off")
    radius_scale: float = _help("build: the radius as a multiple of that quantile", default=1.0)
    calibration: str | None = _help("build: a file of text that is NOT the memory's domain (one text per line, or JSONL with a 'text' field; never test data): each layer's radius stays below the calibration_quantile of its tokens' distances to the nearest key", default=None)
    calibration_quantile: float = _help("build: see calibration", default=0.001)
    probe_tokens: int = _help("build, with radius_quantile and no calibration text: sample this many tokens of the stock model's own text (from its BOS token, seed 0) and refuse to write a memory whose first MoE layer's radius admits more than probe_bound of them, naming the fix (0: off; beyond the paper)", default=0)
    probe_bound: float = _help("build: see probe_tokens", default=0.01)
    positions: str = _help("build: keep (and score) positions whose next token is in the gold answer, or `all` positions after the first, each scored on its own next token (the paper's every time step)", default="answer")
    shard_tokens: int = _help("build: flush a shard every this many stored positions (resume granularity)", default=50_000)
    labels: str | None = _help("build: teacher-force the answers of a labels file (self- or judge-labelled references, [docs/unlabelled.md](docs/unlabelled.md)) instead of gold", default=None)

    def __post_init__(self):
        def bad(name, why):
            raise KnnMoeError(f"model_arg {name}={getattr(self, name)!r}: {why}")

        preset = self.preset if self.preset is not UNSET else "paper"
        if preset not in PRESETS:
            raise KnnMoeError(f"model_arg preset={preset!r}: choose one of {', '.join(PRESETS)}")
        given = PRESETS[preset]
        if self.calibration in (None, UNSET):
            given = {**given, **UNCALIBRATED.get(preset, {})}
        for f in fields(self):
            if getattr(self, f.name) is UNSET:
                object.__setattr__(self, f.name, given.get(f.name, f.metadata["default"]))
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
        if isinstance(self.sigma, str) and self.sigma != "mean_nn":
            bad("sigma", "choose auto, mean_nn or a positive number")
        if isinstance(self.sigma, (int, float)) and not (math.isfinite(self.sigma) and self.sigma > 0):
            bad("sigma", "must be a positive number, or auto, or mean_nn")
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
        if not (isinstance(self.probe_tokens, int) and self.probe_tokens >= 0):
            bad("probe_tokens", "must be an integer >= 0 (0: no probe)")
        if not 0 <= self.probe_bound <= 1:
            bad("probe_bound", "must be in [0, 1]")
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
        # without calibration text, the model's own samples stand in for it: a radius admitting them is refused
        "probe_tokens": 1024,
        # evaluation: the proposal averages two neighbours' values (one reference's z* is fitted to its own
        # sequence); chosen on the README toy, k 1/2/3/4: 0.945/0.983/0.978/0.980 shifted (docs/plus.md)
        "k": 2,
    },
}
# ... and what a preset sets instead when the build names no calibration text: nothing since the layers must agree
# (mixing.agree_with_earlier), which keeps every toy's in-domain tokens out without the cap (docs/plus.md)
UNCALIBRATED: dict[str, dict[str, Any]] = {"plus": {}}


def default(name: str, preset: str = "paper") -> Any:
    """The default of option `name` under `preset`: the runner, the demo and the docs read it from here."""
    if name in PRESETS.get(preset, {}):
        return PRESETS[preset][name]
    return next(f.metadata["default"] for f in fields(KnnMoeOptions) if f.name == name)


NONE_WORDS = ("auto", "none", "None", "")  # what a model_arg may say for "not set", where None is allowed


def parse(f, value: Any, label: str) -> Any:
    """One model_arg's value as field `f`'s annotated type (lm-eval has already turned "1" into 1 and "True" into
    True; finish the job): "auto"/"none" -> None where None is allowed, integers, numbers, booleans, text."""
    kinds = {t.strip() for t in str(f.type).split("|")}
    if "None" in kinds and (value is None or value in NONE_WORDS):
        return None
    if "bool" in kinds:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise KnnMoeError(f"{label} {f.name}={value!r}: choose true or false")
    if "int" in kinds or "float" in kinds:
        try:
            number = float(value)
        except (TypeError, ValueError):
            if "str" in kinds and isinstance(value, str):  # a number or a word (sigma=mean_nn): the field checks it
                return value
            raise KnnMoeError(f"{label} {f.name}={value!r} is not a number") from None
        if "float" in kinds:
            return number
        if not number.is_integer():
            raise KnnMoeError(f"{label} {f.name}={value!r} must be an integer")
        return int(number)
    return str(value)


def split_model_args(kwargs: dict, passthrough: set[str], cls: type = None, label: str = "model_arg"):
    """`cls`'s options (KnnMoeOptions by default) and the rest. `passthrough` are the names the wrapped lm-eval model
    itself accepts; anything else that looks like a misspelling of one of ours is refused instead of being forwarded
    to `from_pretrained`."""
    cls = cls or KnnMoeOptions
    ours = {f.name: f for f in fields(cls)}
    rest = {k: v for k, v in kwargs.items() if k not in ours}
    for name in rest:
        if name in passthrough:
            continue
        close = difflib.get_close_matches(name, ours, n=1, cutoff=0.75)
        if close:
            raise KnnMoeError(f"unknown {label} {name!r}; did you mean {close[0]!r}? Options: {', '.join(ours)}")
    return cls(**{k: parse(ours[k], v, label) for k, v in kwargs.items() if k in ours}), rest


def markdown_table(cls: type = None) -> str:
    """The README's option table: one row per option, its default and its help text."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in fields(cls or KnnMoeOptions):
        d = f.metadata["default"]
        shown = f.metadata.get("shown") or ("—" if d is None else str(d).lower() if isinstance(d, bool)
                                            else f"{d:g}" if isinstance(d, float) else d)
        rows.append(f"| `{f.name}` | {shown if shown == '—' else f'`{shown}`'} | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
