"""kNN-MoE (Selective), the paper's Table 3 variant: retrieval off for the requests the stock model is sure of.

A first pass scores every document's context with the stock model (lm-eval's rolling loglikelihood, perplexity
per token); documents below `selective_ppl`, or the `selective_fraction` of each task's documents with the lowest
perplexity, then run as the stock model and the rest with retrieval. Retrieval acts on each request alone, so
skipping it gives exactly that request's zero-shot result.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
from lm_eval.api.instance import Instance


def lowest_fraction(ppl: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the `fraction` of items with the lowest perplexity (ties in item order)."""
    ppl = np.asarray(ppl, dtype=np.float64)
    mask = np.zeros(ppl.size, dtype=bool)
    mask[np.argsort(ppl, kind="stable")[: int(round(fraction * ppl.size))]] = True
    return mask


def context_perplexity(lm, contexts: list[str]) -> np.ndarray:
    """Perplexity of each context under `lm` (lm-eval's rolling loglikelihood, per token of the context): the
    paper's Table 2 buckets and Selective's threshold use this one definition."""
    requests = [Instance("loglikelihood_rolling", doc={}, arguments=(c,), idx=0) for c in contexts]
    logliks = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    tokens = [max(1, len(lm.tok_encode(c))) for c in contexts]
    return np.exp(-np.array(logliks, dtype=np.float64) / np.array(tokens))


def skipped_documents(lm, requests, selective_ppl: float | None, fraction: float | None) -> set[tuple[str, int]]:
    """The (task, doc_id) whose context's stock perplexity falls below the threshold. A document's requests
    share one context; under `fraction` each task's documents are ranked by it, ties in doc_id order."""
    docs = sorted({(r.task_name, r.doc_id): r.args[0] for r in requests}.items())
    with lm.retrieval_off():
        ppl = dict(zip((d for d, _ in docs), context_perplexity(lm, [c for _, c in docs])))
    if selective_ppl is not None:
        return {d for d, p in ppl.items() if p < selective_ppl}
    skipped = set()
    for task in {t for t, _ in ppl}:
        mine = [d for d in ppl if d[0] == task]  # sorted by doc_id
        mask = lowest_fraction(np.array([ppl[d] for d in mine]), fraction)
        skipped |= {d for d, m in zip(mine, mask) if m}
    return skipped


def run_selective(lm, run, requests, disable_tqdm: bool) -> tuple[list, int]:
    """`run(requests)` with retrieval, except for the documents Selective skips, which run as the stock model;
    returns the results in request order and the number of documents skipped."""
    skipped = skipped_documents(lm, requests, lm.options.selective_ppl, lm.options.selective_fraction)
    skip = [(r.task_name, r.doc_id) in skipped for r in requests]
    results = [None] * len(requests)
    for off in (False, True):
        where = [i for i, s in enumerate(skip) if s == off]
        if not where:
            continue
        with lm.retrieval_off() if off else nullcontext():
            for i, out in zip(where, run([requests[i] for i in where], disable_tqdm=disable_tqdm)):
                results[i] = out
    return results, len(skipped)
