"""C3PO (Li, Li & Zhou 2025, arXiv 2504.07964): test-time re-mixing of routing weights, the paper's Table 10 baseline.

For each test input x, C3PO takes its nearest reference examples that the stock model answers correctly ("successful
neighbours", by a sentence embedding) and moves x's own routing weights omega in the last layers toward what works
for them, by neighbourhood gradient descent (NGD, its best variant):

    N(x)   = the k references nearest to x among those the stock model answers, by embedding cosine
    K_i    = exp(-||e(x_i) - e(x)||^2 / (2 sigma^2))          Gaussian kernel on unit embeddings (||.||^2 = 2 - 2 cos)
    L(w)   = sum_i K_i l(x_i; w) / sum_i K_i                  l: mean NLL of x_i's gold answer, routed with w
    w_0    = x's own router logits at its last context token, in each critical layer
    w     <- w - lr * grad L(w) restricted to the core experts (top-c of w_0), `steps` times

then x is answered with w in place of the router logits of the critical layers at its answer positions. Routing
with w means: at the positions that predict the answer (the last context token, and every generated token when
generating: where C3PO's own code puts its custom weights) the critical layers' routers output w, and the family's
own gating turns it into weights. The reference set is the same `_ref` task every method uses; a first pass
(`mode=build`) records which references the stock model answers (its greedy decoding of the gold answer).

    lm_eval --model hf-c3po --model_args pretrained=M,mode=build,references=c3po/X.json --tasks knnmoe_X_ref
    lm_eval --model hf-c3po --model_args pretrained=M,references=c3po/X.json --tasks knnmoe_X
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..core.build import RefSequence, pad_batch
from ..core.files import write_json_atomic
from ..core.hooks import Recorder, hooked_routers
from ..core.options import option, split_model_args
from ..core.routers import RouterSite, find_routers
from ..errors import KnnMoeError
from ..harness.requests import encode_request, refuse_several_answers

log = logging.getLogger(__name__)

_HF_ARGS = set(inspect.signature(HFLM.__init__).parameters)


@dataclass(frozen=True)
class C3POOptions:
    references: str | None = option("JSON of the references and whether the stock model answers them: written by mode=build, read in eval mode", None)
    mode: str = option("eval: answer with per-input NGD; build: record which references the stock model answers", "eval")
    neighbours: int = option("successful neighbours per test input (C3PO's code: 3)", 3)
    layers: int = option("critical layers: the last this many MoE layers (C3PO: the last 5 of OLMoE's 16)", 5)
    core_experts: int = option("core experts: only the top this many of the initial weights move (C3PO: 20 of 64)", 20)
    steps: int = option("NGD steps per test input (C3PO: about 10 suffice)", 10)
    lr: float = option("NGD step size on the router logits", 10.0)
    sigma: float = option("bandwidth of the Gaussian kernel on unit sentence embeddings", 1.0)
    encoder: str | None = option("sentence encoder, as the similarity 5-shot baseline's (fewshot.make_encoder): auto | qwen3 | minilm | tfidf | DIR; default $KNNMOE_FEWSHOT_ENCODER or auto", None)

    def __post_init__(self):
        def bad(name, why):
            raise KnnMoeError(f"hf-c3po model_arg {name}={getattr(self, name)!r}: {why}")

        if self.mode not in ("eval", "build"):
            bad("mode", "choose eval or build")
        if self.references is None:
            bad("references", "hf-c3po needs references=FILE (written by mode=build on the benchmark's _ref task)")
        if self.mode == "eval" and not Path(self.references).is_file():
            bad("references", "no such file; write it first with mode=build on the benchmark's _ref task")
        for name in ("neighbours", "layers", "core_experts", "steps"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                bad(name, "must be an integer >= 1")
        if not self.lr > 0 or not self.sigma > 0:
            bad("lr" if not self.lr > 0 else "sigma", "must be > 0")


# -- the method, on any HF MoE model -----------------------------------------------------------------------------
def kernel_weights(cos: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian kernel (k,) from cosines (k,) of unit embeddings, whose squared distance is 2 - 2 cos."""
    return torch.exp(-(2.0 - 2.0 * cos) / (2.0 * sigma**2))


def core_experts(w0: torch.Tensor, c: int) -> torch.Tensor:
    """(E,) mask of the c experts with the largest initial logits: the only ones NGD moves."""
    mask = torch.zeros_like(w0, dtype=torch.bool)
    mask[w0.topk(min(c, w0.numel())).indices] = True
    return mask


class Pathway:
    """Hook transform: in the critical layers, the router logits of the answer positions become w (one (E,) row
    per layer, broadcast to every such position); every other position and layer routes as stock.

    `batch` sequences of equal length share each forward; the answer positions are those from `start` on (scoring
    a continuation), or the last position of each sequence (`start` None: generation, one new token per step)."""

    def __init__(self, w: dict[int, torch.Tensor], batch: int = 1, start: int | None = None,
                 rows: torch.Tensor | None = None):
        self.w, self.batch, self.start, self.rows = w, batch, start, rows

    def _rows(self, n_tokens: int, device) -> torch.Tensor:
        if self.rows is not None:  # (n_tokens,) bool, given by the caller
            return self.rows.to(device)
        length = n_tokens // self.batch
        t = torch.arange(n_tokens, device=device) % length
        return t >= (length - 1 if self.start is None else self.start)

    def __call__(self, site: RouterSite, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w = self.w.get(site.layer)
        if w is None:
            return z
        rows = self._rows(z.shape[0], z.device)
        return torch.where(rows.unsqueeze(-1), w.to(z.dtype).expand_as(z), z)  # (n_tokens, E)


@dataclass
class Reference:
    question: str  # embedded to find neighbours
    sequence: RefSequence  # context + gold answer, tokenized as lm-eval's `hf` does


class C3PO:
    """Per-input NGD over the critical layers' routing, against the successful references' loss."""

    def __init__(self, model: torch.nn.Module, sites: list[RouterSite], references: list[Reference], encoder,
                 options: C3POOptions, pad_id: int):
        self.model, self.opts, self.pad_id = model, options, pad_id
        for p in model.parameters():
            p.requires_grad_(False)  # only w is differentiated
        self.critical = sites[-options.layers:]
        self.references, self.encoder = references, encoder
        if not references:  # C3PO's filter can leave nothing on a hard, small reference set: it then adapts nothing
            log.warning("C3PO: the stock model answers none of the references; every input is answered as stock")
        else:
            self.pool = torch.as_tensor(encoder.fit([r.question for r in references]), dtype=torch.float32)  # (N, D)
        self.device = next(model.parameters()).device
        self.last_losses: list[float] = []  # L(w) before each step, for the latest input
        self.totals = {"inputs": 0, "loss_first_step": 0.0, "loss_last_step": 0.0}  # over every adapted input

    def neighbours(self, question: str) -> tuple[list[int], torch.Tensor]:
        """The k successful references nearest to `question`, and their kernel weights (k,)."""
        query = torch.as_tensor(self.encoder.embed([question])[0], dtype=torch.float32)  # (D,)
        cos, idx = (self.pool @ query).topk(min(self.opts.neighbours, len(self.references)))
        return idx.tolist(), kernel_weights(cos, self.opts.sigma)

    @torch.no_grad()
    def initial_pathway(self, tokens: list[int]) -> dict[int, torch.Tensor]:
        """x's own router logits at its last token, in each critical layer: (E,) fp32 each."""
        recorder = Recorder()
        with hooked_routers(self.critical, recorder):
            self.model(torch.tensor([tokens], device=self.device))
        return {layer: z[-1].float() for layer, z in recorder.logits.items()}

    def loss(self, w: dict[int, torch.Tensor], idx: list[int], weights: torch.Tensor) -> torch.Tensor:
        """L(w): the kernel-weighted mean NLL of the neighbours' gold answers, routed with w."""
        seqs = [self.references[i].sequence for i in idx]
        inputs, mask, targets, scored = pad_batch(seqs, self.pad_id, self.device)  # scored: the answer positions
        with hooked_routers(self.critical, Pathway(w, rows=scored.reshape(-1))):
            logits = self.model(input_ids=inputs, attention_mask=mask).logits.float()  # (k, T, V)
        logp = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (k, T)
        per_seq = -(logp * scored).sum(-1) / scored.sum(-1)  # (k,)
        weights = weights.to(per_seq.device)
        return (weights * per_seq).sum() / weights.sum()

    def adapt(self, question: str, tokens: list[int]) -> dict[int, torch.Tensor]:
        """The routing w for the test input with these tokens (up to its last context token)."""
        self.last_losses = []
        if not self.references:
            return {}
        idx, weights = self.neighbours(question)
        w0 = self.initial_pathway(tokens)
        core = {layer: core_experts(w, self.opts.core_experts) for layer, w in w0.items()}
        w = {layer: v.clone().requires_grad_(True) for layer, v in w0.items()}
        for _ in range(self.opts.steps):
            with torch.enable_grad():
                loss = self.loss(w, idx, weights)
                grads = torch.autograd.grad(loss, list(w.values()), allow_unused=True)
            self.last_losses.append(float(loss.detach()))
            with torch.no_grad():
                for (layer, v), g in zip(w.items(), grads):
                    if g is not None:
                        v -= self.opts.lr * g * core[layer]
        self.totals["inputs"] += 1
        self.totals["loss_first_step"] += self.last_losses[0]
        self.totals["loss_last_step"] += self.last_losses[-1]
        return {layer: v.detach() for layer, v in w.items()}

    def diagnostics(self) -> dict:
        """How many references were successful, and the neighbours' loss before the first and the last NGD step,
        averaged over the adapted inputs."""
        n = max(self.totals["inputs"], 1)
        return {"successful_references": len(self.references), "inputs": self.totals["inputs"],
                "mean_loss_first_step": self.totals["loss_first_step"] / n,
                "mean_loss_last_step": self.totals["loss_last_step"] / n}


# -- lm-eval glue --------------------------------------------------------------------------------------------------
def _question(doc, context: str) -> str:
    """What the sentence encoder sees: the doc's question, as the 5-shot sampler; the prompt if it has none."""
    question = doc.get("question") if isinstance(doc, dict) else None
    return question if isinstance(question, str) else context


@register_model("hf-c3po")
class C3POLM(HFLM):
    """lm-eval's `hf` answering each test input after its own NGD; batching and tokenization stay `hf`'s."""

    def __init__(self, pretrained, **kwargs):
        self.c3po, hf_kwargs = split_model_args(kwargs, _HF_ARGS, C3POOptions, "hf-c3po model_arg")
        super().__init__(pretrained=pretrained, **hf_kwargs)
        self.sites = find_routers(self.model)
        self.pathway: Pathway | None = None  # set while one test input is answered
        self.method = None
        if self.c3po.mode == "eval":
            self.method = C3PO(self.model, self.sites, self._read_references(), self._encoder(), self.c3po,
                               self.tokenizer.pad_token_id or 0)

    def _encoder(self):
        from ..benchmarks.fewshot import make_encoder

        return make_encoder(self.c3po.encoder)

    def _read_references(self) -> list[Reference]:
        saved = json.loads(Path(self.c3po.references).read_text())
        refs = [r for r in saved["references"] if r["answered"]]
        log.info("C3PO: %d of %d references answered by the stock model", len(refs), len(saved["references"]))
        return [Reference(r["question"], encode_request(self, (r["task"], r["doc_id"], 0), r["context"],
                                                        r["continuation"])) for r in refs]

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self.pathway is None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        self.pathway.batch = inps.shape[0]
        with hooked_routers(self.method.critical, self.pathway):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.pathway is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        self.pathway.batch = context.shape[0]
        with hooked_routers(self.method.critical, self.pathway):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.method is None:
            return self._record(requests, disable_tqdm)
        docs: dict[tuple[str, int], list[int]] = {}
        for i, r in enumerate(requests):
            docs.setdefault((r.task_name, r.doc_id), []).append(i)
        results = [None] * len(requests)
        for where in tqdm(docs.values(), desc="C3PO", disable=disable_tqdm or self.rank != 0):
            seqs = [encode_request(self, (requests[i].task_name, requests[i].doc_id, requests[i].idx),
                                   *requests[i].args) for i in where]
            starts = [len(s.tokens) - s.n_cont for s in seqs]  # the last context token: the answer starts after it
            first = requests[where[0]]
            w = self.method.adapt(_question(first.doc, first.args[0]), seqs[0].tokens[: starts[0] + 1])
            for start in sorted(set(starts)):  # one start per call (they differ only for left-truncated inputs)
                mine = [i for i, s in zip(where, starts) if s == start]
                self.pathway = Pathway(w, start=start)
                try:
                    out = super().loglikelihood([requests[i] for i in mine], disable_tqdm=True)
                finally:
                    self.pathway = None
                for i, o in zip(mine, out):
                    results[i] = o
        return results

    def generate_until(self, requests, disable_tqdm: bool = False):
        if self.method is None:
            raise KnnMoeError("hf-c3po mode=build records references from a loglikelihood _ref task; "
                              "generate with mode=eval")
        results = []
        for r in tqdm(requests, desc="C3PO", disable=disable_tqdm or self.rank != 0):
            context = r.args[0]
            w = self.method.adapt(_question(r.doc, context), self.tok_encode(context)[-self.max_length:])
            self.pathway = Pathway(w, start=None)
            try:
                results += super().generate_until([r], disable_tqdm=True)
            finally:
                self.pathway = None
        return results

    def _record(self, requests, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """mode=build: the stock loglikelihood of each reference's gold answer, and whether greedy decoding
        produces it (the model answers the reference); written to `references` for the evaluation."""
        if self.world_size > 1:
            raise KnnMoeError("hf-c3po mode=build runs in one process (it is one stock pass over the references)")
        rids = [(r.task_name, r.doc_id, r.idx) for r in requests]
        refuse_several_answers(rids, "a C3PO reference task")
        start = time.perf_counter()
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self.record_wall_s = time.perf_counter() - start
        records = [{"task": r.task_name, "doc_id": r.doc_id, "question": _question(r.doc, r.args[0]),
                    "context": r.args[0], "continuation": r.args[1], "answered": bool(greedy), "loglik": ll}
                   for r, (ll, greedy) in zip(requests, results)]
        write_json_atomic(Path(self.c3po.references), {"references": records})
        log.info("C3PO references: the stock model answers %d of %d", sum(r["answered"] for r in records),
                 len(records))
        return results

    def get_model_info(self) -> dict:
        """lm-eval puts this into the results JSON's `config`: our options and, in eval mode, the diagnostics."""
        info = {"options": vars(self.c3po).copy()}
        if self.method is not None:
            info["diagnostics"] = self.method.diagnostics()
        return {**super().get_model_info(), "c3po": info}
