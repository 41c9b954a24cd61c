"""`hf-knnmoe`: lm-eval's `hf` model with kNN-MoE routing, in the shape of lm-eval's `hf_steered.py`.

Everything `hf` does (tokenization, batching, chat templates, data parallelism) is inherited untouched; the
routers are hooked only inside `_model_call` and `_model_generate`. In `mode=build` the model instead
teacher-forces the build task's gold answers (or, with `labels=FILE`, pseudo-labels: `labels.py`) and writes a
memory (see `build.py`). With `selective_ppl=` or `selective_fraction=` (the paper's Selective variant) a first
pass scores every request's context under the stock model and retrieval stays off for the confident ones.

    lm_eval --model hf-knnmoe --model_args pretrained=M,memory=memories/X --tasks medmcqa
    lm_eval --model hf-knnmoe --model_args pretrained=M,mode=build,memory=memories/X --tasks knnmoe_medmcqa_ref
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .build import MemoryBuilder, encode_request, refuse_several_answers
from .errors import KnnMoeError
from .families import find_routers
from .hooks import hooked_routers
from .labels import labelled_continuation, read_labels
from .memory import load_memory, model_signature
from .options import split_model_args
from .retrieval import Retriever
from .stats import lowest_fraction

log = logging.getLogger(__name__)

_HF_ARGS = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


@register_model("hf-knnmoe")
class KnnMoeLM(HFLM):
    def __init__(self, pretrained, **kwargs):
        self.knn, hf_kwargs = split_model_args(kwargs, passthrough=_HF_ARGS)
        super().__init__(pretrained=pretrained, **hf_kwargs)
        self.sites = find_routers(self.model)  # unsupported family or no routers: fail before any forward
        if self.knn.mode == "build":
            self._init_distributed_cpu()
            signature = model_signature(self.model, self.sites)
            self.builder = MemoryBuilder(self.model, self.sites, signature, self.knn, self.rank, self.world_size)
            self.retriever = None
        else:
            memory = load_memory(self.knn.memory, self.knn.verify)
            self.retriever = Retriever(self.model, memory, self.knn, sites=self.sites)
        self._retrieve = True  # Selective turns retrieval off for the requests it skips
        self.skipped: int | None = None  # documents Selective ran without retrieval

    def _init_distributed_cpu(self) -> None:
        """`hf` wires data parallelism for accelerators only; a CPU `accelerate launch` build splits requests too."""
        acc = getattr(self, "accelerator", None)
        if acc is not None and acc.num_processes > 1 and self._world_size == 1:
            self._rank, self._world_size = acc.process_index, acc.num_processes

    @contextmanager
    def _routing(self, attention_mask: torch.Tensor | None = None) -> Iterator[None]:
        if self.retriever is None:
            raise KnnMoeError(
                "mode=build only teacher-forces loglikelihood build tasks (output_type loglikelihood, or "
                "multiple_choice emitting only the gold answer); evaluate with mode=eval"
            )
        if not self._retrieve:
            yield
            return
        self.retriever.token_mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
        try:
            with hooked_routers(self.sites, self.retriever):
                yield
        finally:
            self.retriever.token_mask = None

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self._routing():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self._routing(generation_kwargs.get("attention_mask")):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.knn.mode != "build":
            return self._selective(super().loglikelihood, requests, disable_tqdm)
        return self._build(requests)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._selective(super().generate_until, requests, disable_tqdm)

    # -- Selective ---------------------------------------------------------------------------------------------
    @contextmanager
    def _retrieval_off(self) -> Iterator[None]:
        self._retrieve = False
        try:
            yield
        finally:
            self._retrieve = True

    def _selective(self, run, requests, disable_tqdm: bool) -> list:
        """Run `requests` with retrieval, except those Selective skips, which run as the stock model."""
        if self.knn.selective_ppl is None and self.knn.selective_fraction is None:
            return run(requests, disable_tqdm=disable_tqdm)
        skipped = self._skipped(requests)
        skip = [(r.task_name, r.doc_id) in skipped for r in requests]
        results = [None] * len(requests)
        for off in (False, True):
            where = [i for i, s in enumerate(skip) if s == off]
            if not where:
                continue
            with self._retrieval_off() if off else nullcontext():
                for i, out in zip(where, run([requests[i] for i in where], disable_tqdm=disable_tqdm)):
                    results[i] = out
        self.skipped = (self.skipped or 0) + len(skipped)
        return results

    def _skipped(self, requests) -> set[tuple[str, int]]:
        """The (task, doc_id) whose context's stock perplexity falls below the threshold. A document's requests
        share one context; under selective_fraction each task's documents are ranked by it, ties in doc_id order."""
        docs = sorted({(r.task_name, r.doc_id): r.args[0] for r in requests}.items())
        with self._retrieval_off():
            ppl = dict(zip((d for d, _ in docs), context_perplexity(self, [c for _, c in docs])))
        if self.knn.selective_ppl is not None:
            skipped = {d for d, p in ppl.items() if p < self.knn.selective_ppl}
        else:
            skipped = set()
            for task in {t for t, _ in ppl}:
                mine = [d for d in ppl if d[0] == task]  # sorted by doc_id
                mask = lowest_fraction(np.array([ppl[d] for d in mine]), self.knn.selective_fraction)
                skipped |= {d for d, m in zip(mine, mask) if m}
        return skipped

    def _build(self, requests) -> list[tuple[float, bool]]:
        rids = [(r.task_name, r.doc_id, r.idx) for r in requests]
        refuse_several_answers(rids, "a build task")
        # pseudo-labels (labels.py): every request's gold continuation is replaced by its label's, never mixed
        labels = read_labels(self.knn.labels) if self.knn.labels else None
        sequences = {}
        for rid, req in zip(rids, requests):
            if rid not in sequences:  # lm-eval pads short ranks with duplicates of their last request
                context, continuation = req.args
                if labels is not None:
                    continuation = labelled_continuation(labels, rid[0], rid[1], context, self.knn.labels)
                sequences[rid] = encode_request(self, rid, context, continuation)
        batch = self.batch_size if isinstance(self.batch_size, int) else 8
        start = time.perf_counter()
        results = self.builder.run(list(sequences.values()), self.tokenizer.pad_token_id or 0, batch)
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()
        if self.rank == 0:
            self.builder.finalize()
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()
        self.build_wall_s = time.perf_counter() - start  # the cost the paper compares with SFT's training time
        log.info("kNN-MoE build: %d sequences in %.1f s", len(sequences), self.build_wall_s)
        return [results[rid] for rid in rids]

    def get_model_info(self) -> dict:
        """lm-eval puts this into the results JSON's `config`: our options and, in eval mode, the diagnostics."""
        info = {**super().get_model_info(), "knnmoe": {"options": vars(self.knn).copy()}}
        if self.retriever is not None:
            diag = self.retriever.diagnostics()
            info["knnmoe"]["diagnostics"] = diag
            for layer, d in diag.items():
                log.info("kNN-MoE layer %s: mean lambda %.3f, top-k changed %.1f%% of %d tokens", layer,
                         d["mean_lambda"], 100 * d["topk_changed"], d["tokens"])
            if self.knn.diagnostics:
                Path(self.knn.diagnostics).write_text(json.dumps(diag, indent=2))
        if self.skipped is not None:
            info["knnmoe"]["selective_skipped"] = self.skipped
        return info


def context_perplexity(lm: HFLM, contexts: list[str]) -> np.ndarray:
    """Perplexity of each context under `lm` (lm-eval's rolling loglikelihood, per token of the context): the
    paper's Table 2 buckets and Selective's threshold use this one definition."""
    requests = [Instance("loglikelihood_rolling", doc={}, arguments=(c,), idx=0) for c in contexts]
    logliks = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    tokens = [max(1, len(lm.tok_encode(c))) for c in contexts]
    return np.exp(-np.array(logliks, dtype=np.float64) / np.array(tokens))
