"""lm-eval requests as the build reads them: tokenized as `hf`'s loglikelihood does, one gold answer per document."""

from __future__ import annotations

from ..core.build import RefSequence, RequestId, tokenize_request
from ..errors import KnnMoeError


def encode_request(lm, rid: RequestId, context: str, continuation: str) -> RefSequence:
    """A build request's tokens as lm-eval's `hf` (`lm`, an HFLM) tokenizes a loglikelihood request, the stored
    positions being the answer's own tokens.

    `hf` moves the context's trailing whitespace into the continuation so that the tokenizer spaces the answer
    its own way (" B" is one token in every BPE here). Where that whitespace stays a token of its own, as the
    newline that ends a chat template's assistant header (`<|assistant|>\n`, `<|im_start|>assistant\n`), it is
    the template's, not the answer's: it goes back to the context, so it is neither stored nor in the loss, and
    the sequence's tokens stay exactly `hf`'s. The loglikelihood the build reports is then the answer's alone. A
    delimiter that is the continuation's own (" B" after "Answer:") stays in it, whatever the tokenizer makes of it.
    """
    if context:
        ctx, cont = lm._encode_pair(context, continuation)
        moved = len(context) - len(context.rstrip())  # the context's whitespace that hf put before the answer
        lead = 0
        while lead < len(cont) - 1:
            head = lm.tokenizer.decode(cont[: lead + 1], skip_special_tokens=False)
            if head.strip() or len(head) > moved:
                break
            lead += 1
        ctx, cont = ctx + cont[:lead], cont[lead:]
    else:
        ctx, cont = [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False)
    return tokenize_request(rid, ctx, cont, lm.max_length)


def refuse_several_answers(rids: list[RequestId], purpose: str) -> None:
    """Teacher-forcing needs one target per document: refuse tasks that emit every answer choice."""
    per_doc: dict[tuple[str, int], set[int]] = {}
    for task, doc, idx in rids:
        per_doc.setdefault((task, doc), set()).add(idx)
    multi = sorted({task for (task, _), idxs in per_doc.items() if len(idxs) > 1})
    if multi:
        raise KnnMoeError(
            f"task(s) {multi} emit several answer choices per document; {purpose} must teacher-force only the gold "
            "answer (use a knnmoe_*_ref task, or see README 'Turning a task into a build task')"
        )


def reference_sequences(lm, requests, labels_path: str | None = None) -> list[RefSequence]:
    """The build's reference sequences from lm-eval's loglikelihood requests, one per (task, doc, choice).

    lm-eval pads short ranks with duplicates of their last request: each request is encoded once. With
    `labels_path` (pseudo-labels, `labels.py`), every request's gold continuation is replaced by its label's.
    """
    from .labels import labelled_continuation, read_labels

    rids = [(r.task_name, r.doc_id, r.idx) for r in requests]
    refuse_several_answers(rids, "a build task")
    labels = read_labels(labels_path) if labels_path else None
    sequences: dict[RequestId, RefSequence] = {}
    for rid, req in zip(rids, requests):
        if rid not in sequences:
            context, continuation = req.args
            if labels is not None:
                continuation = labelled_continuation(labels, rid[0], rid[1], context, labels_path)
            sequences[rid] = encode_request(lm, rid, context, continuation)
    return list(sequences.values())
