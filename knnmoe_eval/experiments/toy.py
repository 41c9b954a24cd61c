"""A toy domain-shift problem that routing alone can fix: the data half of the project's offline demo.

kNN-MoE only changes *which experts* a frozen MoE uses. To show it working in minutes on a CPU we need a model
whose experts already know every answer of a shifted domain while its router sends that domain's tokens to the
wrong experts. This module makes such a model and its data.

Task. A sequence is a domain marker followed by (symbol, image) pairs, e.g. ``A: cf ak t`` → ``w``: every
symbol is mapped by its domain's rule, a random permutation of the alphabet. The training domains' rules are
chosen so that, for every symbol, all domains disagree, which makes the other domains' images ready-made
distractors: each test item is a 4-way multiple choice (one image per training rule) scored by loglikelihood.
Only the image tokens are trained on (the symbols are random, there is nothing to learn about them).

Why the shift is a routing problem. Training follows DEMix (Gururangan et al., 2022, domain expert mixtures):
besides the LM loss, a routing loss sends every token of domain d to its own block of experts (8 experts, 4
domains: A owns experts 0-1, B 2-3, ...), so each rule's table lives in known experts and the router, which reads
the marker through attention, is what chooses the rule. Left free, the toy's router splits tokens by symbol and
every expert learns all rules from the marker, so no routing could change an answer; supervision is what makes
the premise of kNN-MoE (the experts can, the router does not) hold by construction. The shifted domain has a
marker never seen in training and answers each symbol with the rule of one training domain, chosen per symbol:
``X: ...`` maps c with rule A, a with rule C, and so on. Every answer is therefore stored in trained experts;
what the model lacks is a router that, for symbol c under marker X, picks A's experts. The stock router, facing
an unseen marker, is near chance; routing the query position as it is routed under the right marker restores
almost all of it, and because the right experts depend on the symbol no constant per-layer offset can.
`scripts/toy_check.py` measures these.

Splits: ``train`` (full sequences), ``indomain_test`` (training domains), ``shift_ref`` (references for a kNN-MoE
memory), ``shift_test``. All texts are unique across splits. ``train_or_load`` caches the trained model, its
tokenizer and the JSONL splits in one directory keyed by a hash of the config, so that directory is at once
``pretrained=...`` for lm-eval and the place the tasks in ``tasks/toy`` read their data from.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from knnmoe_eval.errors import KnnMoeError

FORMAT_VERSION = 1  # bump when the generator or training changes in a way the config does not capture
TOY_SPLITS = ("train", "indomain_test", "shift_ref", "shift_test")
TOY_JSON = "toy.json"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_MARKERS = "ABCDEFGH"
SHIFT_MARKER = "X"
_FAMILIES = ("olmoe", "qwen3_moe", "mixtral")
_LATER_FIELDS = {"family": "olmoe", "shift": "symbol"}
_SHIFTS = ("symbol", "pair")
TRAIN_THREADS = 1  # see train(): the toy's weights must not depend on the machine's thread count


@dataclass(frozen=True)
class ToyConfig:
    seed: int = field(default=0, metadata={"help": "seeds the rules, every split and the training run"})
    n_symbols: int = field(default=16, metadata={"help": "alphabet size (lowercase letters)"})
    n_domains: int = field(default=4, metadata={"help": "training domains = choices per test item"})
    min_pairs: int = field(default=2, metadata={"help": "fewest (symbol, image) pairs per sequence, query included"})
    max_pairs: int = field(default=8, metadata={"help": "most (symbol, image) pairs per sequence, query included"})
    n_train: int = field(default=20_000, metadata={"help": "training sequences"})
    n_indomain_test: int = field(default=400, metadata={"help": "in-domain test items (balanced over domains)"})
    n_shift_ref: int = field(default=200, metadata={"help": "shifted-domain reference items (memory build)"})
    n_shift_test: int = field(default=400, metadata={"help": "shifted-domain test items"})
    family: str = field(default="olmoe", metadata={"help": "olmoe | qwen3_moe (norm_topk_prob) | mixtral: the MoE family"})
    shift: str = field(default="symbol", metadata={
        "help": "symbol: the shifted domain picks each answer's rule by its symbol | pair: by its symbol and the "
                "symbol before it (the previous pair's, the query's own for the first pair)"})
    hidden_size: int = 64
    intermediate_size: int = field(default=64, metadata={"help": "per-expert MLP width"})
    n_layers: int = 2
    n_heads: int = 4
    n_experts: int = 8
    top_k: int = 2
    steps: int = field(default=500, metadata={"help": "optimizer steps"})
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    aux_loss_coef: float = field(default=0.01, metadata={"help": "OLMoE load-balancing loss weight"})
    route_supervision: float = field(
        default=1.0, metadata={"help": "weight of the loss that sends each training domain to its own experts"}
    )

    def __post_init__(self):
        if not 2 <= self.n_domains <= len(_MARKERS):
            raise KnnMoeError(f"n_domains must be in [2, {len(_MARKERS)}], got {self.n_domains}")
        if not self.n_domains <= self.n_symbols <= len(_ALPHABET):
            raise KnnMoeError(f"n_symbols must be in [n_domains, {len(_ALPHABET)}], got {self.n_symbols}")
        if self.n_experts % self.n_domains or self.n_experts // self.n_domains < self.top_k:
            raise KnnMoeError(
                f"n_experts ({self.n_experts}) must split into n_domains ({self.n_domains}) groups of >= top_k"
                f" ({self.top_k}) experts"
            )
        if self.shift not in _SHIFTS:
            raise KnnMoeError(f"shift must be one of {', '.join(_SHIFTS)}, got {self.shift!r}")
        if self.family not in _FAMILIES:
            raise KnnMoeError(f"family must be one of {', '.join(_FAMILIES)}, got {self.family!r}")
        if not 1 <= self.min_pairs <= self.max_pairs:
            raise KnnMoeError(f"need 1 <= min_pairs <= max_pairs, got {self.min_pairs}, {self.max_pairs}")

    def key(self) -> str:
        # fields added after the first toys leave the key of a config that keeps their default unchanged
        fields_ = {k: v for k, v in asdict(self).items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
        blob = json.dumps({"format": FORMAT_VERSION, **fields_}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Rules:
    symbols: str
    markers: str  # one per training domain
    images: tuple[str, ...]  # images[d][i]: the image of symbols[i] under domain d
    shift_source: tuple[int, ...]  # shift_source[i]: the domain whose rule the shifted domain uses for symbols[i]
    shift: str = "symbol"  # ToyConfig.shift

    def image(self, domain: int, symbol: str) -> str:
        return self.images[domain][self.symbols.index(symbol)]

    def shift_domain(self, symbol: str, previous: str | None = None) -> int:
        """The training domain whose rule the shifted domain uses for `symbol` (after `previous`, shift=pair)."""
        i = self.symbols.index(symbol)
        if self.shift == "pair":
            i = (i + self.symbols.index(symbol if previous is None else previous)) % len(self.symbols)
        return self.shift_source[i]

    def source(self, marker: str, symbol: str, previous: str | None = None) -> int:
        """The training domain whose rule answers `symbol` after `marker` (and `previous`, the symbol before)."""
        return self.shift_domain(symbol, previous) if marker == SHIFT_MARKER else self.markers.index(marker)

    def answer_source(self, record: dict) -> int:
        """The training domain whose rule answers a generated item's question (`_item`'s record)."""
        return self.source(record["context"][0], record["query"], previous_symbol(record))


def previous_symbol(record: dict) -> str | None:
    """The symbol before a generated item's query symbol (what `shift="pair"` also reads), None for the first."""
    pairs = record["context"].split(":", 1)[1].split()  # "X: cf ak t" -> ["cf", "ak", "t"]
    return pairs[-2][0] if len(pairs) > 1 else None


# The generalisation toy of docs/plus.md, fixed before the `preset=plus` recipe was tuned on the README's toy:
# another seed, twice the layers, a renormalising family (Qwen3-MoE with norm_topk_prob), six training domains
# (six-way questions, twelve experts) over a larger alphabet.
SECOND_TOY = ToyConfig(seed=1, family="qwen3_moe", n_layers=4, n_domains=6, n_experts=12, n_symbols=20, steps=800)
# The third toy (issue 25), fixed before the no-calibration radius was reworked: another family (Mixtral: softmax
# over the top-k only), another seed, three layers, and a shift of another kind: the shifted domain's rule for an
# answer depends on two tokens (its symbol and the symbol before it), so a router must read the context, not only
# the token; six times the references and test items, as the trial had.
THIRD_TOY = ToyConfig(seed=2, family="mixtral", shift="pair", n_layers=3, n_domains=4, n_experts=8, n_symbols=16,
                      steps=600, n_shift_ref=1200, n_shift_test=2400, n_indomain_test=1200)


def make_rules(config: ToyConfig) -> Rules:
    """Random permutations, one per domain, that disagree on every symbol; plus a balanced per-symbol mix of them."""
    rng = random.Random(f"{config.seed}-rules")
    symbols = _ALPHABET[: config.n_symbols]
    images: list[str] = []
    while len(images) < config.n_domains:
        perm = "".join(rng.sample(symbols, len(symbols)))
        if all(perm[i] != other[i] for other in images for i in range(len(symbols))):
            images.append(perm)
    source = [i % config.n_domains for i in range(len(symbols))]
    rng.shuffle(source)
    return Rules(symbols, _MARKERS[: config.n_domains], tuple(images), tuple(source), config.shift)


def _item(rules: Rules, marker: str, queries: list[str]) -> dict:
    """One sequence: the last query is the scored question, the earlier pairs are context that follows the same rule."""
    *given, query = queries
    before = [None, *queries[:-1]]  # the symbol before each one (shift=pair)
    context = f"{marker}:" + "".join(f" {q}{rules.image(rules.source(marker, q, p), q)}"
                                     for q, p in zip(given, before)) + f" {query}"
    choices = [rules.image(d, query) for d in range(len(rules.markers))]
    answer = choices[rules.source(marker, query, before[-1])]
    return {"context": context, "choices": choices, "gold": choices.index(answer), "answer": answer, "query": query}


def generate_splits(config: ToyConfig) -> dict[str, list[dict]]:
    """Every split as a list of records; deterministic for a config, no text shared between splits."""
    rules = make_rules(config)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    sizes = {
        "train": config.n_train,
        "indomain_test": config.n_indomain_test,
        "shift_ref": config.n_shift_ref,
        "shift_test": config.n_shift_test,
    }
    for split in TOY_SPLITS:
        rng = random.Random(f"{config.seed}-{split}")
        records: list[dict] = []
        while len(records) < sizes[split]:
            n_pairs = rng.randint(config.min_pairs, config.max_pairs)
            queries = [rng.choice(rules.symbols) for _ in range(n_pairs)]
            # round-robin keeps the in-domain splits balanced over domains
            marker = SHIFT_MARKER if split.startswith("shift") else rules.markers[len(records) % config.n_domains]
            item = _item(rules, marker, queries)
            text = item["context"] + item["answer"]
            if text in seen:
                continue
            seen.add(text)
            domain = "shift" if marker == SHIFT_MARKER else marker
            records.append({"id": f"{split}-{len(records)}", "domain": domain, **item, "text": text})
        out[split] = records
    return out


def make_model_config(config: ToyConfig):
    from knnmoe_eval.testing import tiny_config

    experts = {"num_local_experts": config.n_experts} if config.family == "mixtral" else {"num_experts": config.n_experts}
    if config.family == "qwen3_moe":
        experts["moe_intermediate_size"] = config.intermediate_size
    return tiny_config(
        config.family,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        head_dim=config.hidden_size // config.n_heads,
        **experts,
        num_experts_per_tok=config.top_k,
        router_aux_loss_coef=config.aux_loss_coef,
        max_position_embeddings=max(64, 3 * config.max_pairs + 4),
    )


def _answer_mask(texts: list[str], length: int):
    """True at token positions holding an image; token t is char t-1 because of the BOS."""
    import torch

    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for row, text in enumerate(texts):
        # text = "M:" + " qi" * n, so images sit at chars 4, 7, 10, ...
        for char in range(4, len(text), 3):
            mask[row, char + 1] = True
    return mask


def _domain_groups(config: ToyConfig, texts: list[str]):
    """(n_texts, n_experts) bool: the experts reserved for each text's domain (domain d owns a contiguous block)."""
    import torch

    size = config.n_experts // config.n_domains
    domain = torch.tensor([_MARKERS.index(text[0]) for text in texts])
    return (torch.arange(config.n_experts) // size)[None, :] == domain[:, None]


def _route_loss(router_logits, groups, keep):
    """DEMix-style routing loss: -log router mass on the domain's own experts, mean over layers and kept tokens."""
    import torch

    seq = keep.numel() // groups.shape[0]
    owned = groups.repeat_interleave(seq, dim=0)[keep]  # (n_kept_tokens, n_experts)
    loss = 0.0
    for logits in router_logits:  # one (batch*seq, n_experts) tensor per MoE layer
        logp = logits[keep].float().log_softmax(-1)
        loss = loss - torch.logsumexp(logp.masked_fill(~owned, float("-inf")), dim=-1).mean()
    return loss / len(router_logits)


def train(config: ToyConfig, train_texts: list[str], progress: bool = True):
    """Train the toy OLMoE from scratch on image tokens only; returns (model, tokenizer, final loss).

    Training runs on TRAIN_THREADS CPU threads whatever OMP_NUM_THREADS says: sums split over more threads round
    differently, and training turns a last-bit difference into another model (2 threads give other weights than
    1 after 40 steps), so every figure measured on the toy would depend on the machine's thread count. A model
    this small gains little from threads.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        return _train(config, train_texts, progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: ToyConfig, train_texts: list[str], progress: bool):
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from knnmoe_eval.testing import make_tokenizer

    torch.manual_seed(config.seed)
    tokenizer = make_tokenizer()
    enc = tokenizer(train_texts, padding=True, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]
    targets = _answer_mask(train_texts, ids.shape[1])
    groups = _domain_groups(config, train_texts)

    model = AutoModelForCausalLM.from_config(make_model_config(config), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / config.warmup) * max(0.05, 1 - s / max(1, config.steps))
    )
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.steps), desc="train toy MoE", disable=not progress)
    loss_ema = None
    for _ in bar:
        rows = torch.randint(0, len(train_texts), (config.batch_size,), generator=gen)
        width = int(attn[rows].sum(1).max())
        x, m, t = ids[rows, :width], attn[rows, :width], targets[rows, :width]
        out = model(input_ids=x, attention_mask=m, output_router_logits=True)
        # position p predicts token p+1; only image tokens are scored
        logits, labels = out.logits[:, :-1], x[:, 1:].masked_fill(~t[:, 1:], -100)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        routed = m.clone()
        routed[:, 0] = 0  # at the BOS the domain is not known yet
        route = _route_loss(out.router_logits, groups[rows], routed.reshape(-1).bool())
        loss = ce + config.aux_loss_coef * out.aux_loss + config.route_supervision * route
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = ce.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * ce.item()
        bar.set_postfix(ce=f"{loss_ema:.3f}")
    return model.eval(), tokenizer, loss_ema


def is_toy_dir(path: str | Path) -> bool:
    return (Path(path) / TOY_JSON).is_file()


def data_file(toy_dir: str | Path, split: str) -> Path:
    if split not in TOY_SPLITS:
        raise KnnMoeError(f"unknown toy split {split!r}; choose one of {', '.join(TOY_SPLITS)}")
    return Path(toy_dir) / "data" / f"{split}.jsonl"


def load_split(toy_dir: str | Path, split: str) -> list[dict]:
    with open(data_file(toy_dir, split)) as f:
        return [json.loads(line) for line in f]


def find_toy_dir(toy_dir: str | None = None, pretrained: str | None = None) -> Path:
    """The toy directory named by `--metadata '{"toy_dir": ...}'`, else by `--model_args pretrained=...`."""
    for candidate in (toy_dir, pretrained):
        if isinstance(candidate, (str, Path)) and is_toy_dir(candidate):
            return Path(candidate)
    raise KnnMoeError(
        f"the knnmoe_toy tasks need a toy directory made by knnmoe_eval.experiments.toy.train_or_load (with {TOY_JSON}); got"
        f" toy_dir={toy_dir!r}, pretrained={pretrained!r}. Pass --model_args pretrained=<toy dir> or"
        """ --metadata '{"toy_dir": "<toy dir>"}'."""
    )


def hf_dataset(toy_split: str, toy_dir: str | None = None, pretrained: str | None = None, **kwargs):
    """lm-eval `custom_dataset`: {"test": split}. Receives --metadata and model_args as keyword arguments."""
    import datasets

    records = load_split(find_toy_dir(toy_dir, pretrained), toy_split)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def train_or_load(cache_dir: str | Path, config: ToyConfig | None = None, progress: bool = True) -> Path:
    """The toy directory for `config` (default ToyConfig()): trained and written on first use, reused after.

    The directory is HF-loadable (`from_pretrained(dir)`, `lm_eval --model_args pretrained=dir`) and holds the
    splits in `data/<split>.jsonl`. The manifest `toy.json` is written last, so its presence means complete.
    """
    config = config or ToyConfig()
    out = Path(cache_dir) / f"toy-{config.key()}"
    if is_toy_dir(out):
        return out
    splits = generate_splits(config)
    start = time.perf_counter()
    model, tokenizer, loss = train(config, [r["text"] for r in splits["train"]], progress=progress)
    seconds = time.perf_counter() - start
    # written aside and renamed into place, so a concurrent caller never sees a half-written toy
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "data").mkdir()
        for split, records in splits.items():
            with open(data_file(tmp, split), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        manifest = {
            "format": FORMAT_VERSION,
            "key": config.key(),
            "config": asdict(config),
            "rules": {**asdict(make_rules(config)), "shift_marker": SHIFT_MARKER},
            "splits": {s: len(r) for s, r in splits.items()},
            "train_seconds": round(seconds, 1),
            "train_threads": TRAIN_THREADS,
            "final_train_ce": loss,
        }
        (tmp / TOY_JSON).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            tmp.rename(out)
        except OSError:
            if not is_toy_dir(out):  # lost a race to an identical toy: fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
