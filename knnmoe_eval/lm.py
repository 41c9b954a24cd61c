"""`hf-knnmoe`: lm-eval's `hf` model with kNN-MoE routing, in the shape of lm-eval's `hf_steered.py`.

Everything `hf` does (tokenization, batching, chat templates, data parallelism) is inherited untouched; the
routers are hooked only inside `_model_call` and `_model_generate`. In `mode=build` the model instead
teacher-forces the build task's gold answers (or, with `labels=FILE`, pseudo-labels: `labels.py`) and writes a
memory (see `build.py`).

    lm_eval --model hf-knnmoe --model_args pretrained=M,memory=memories/X --tasks medmcqa
    lm_eval --model hf-knnmoe --model_args pretrained=M,mode=build,memory=memories/X --tasks knnmoe_medmcqa_ref
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .build import MemoryBuilder, encode_request, refuse_several_answers
from .errors import KnnMoeError
from .families import find_routers
from .hooks import hooked_routers
from .labels import labelled_continuation, read_labels
from .memory import load_memory, model_signature
from .options import KnnMoeOptions, split_model_args
from .retrieval import Retriever

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
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        return self._build(requests)

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
        diag = self.retriever.diagnostics() if self.retriever is not None else None
        return {**super().get_model_info(), "knnmoe": model_info(self.knn, diag)}


def model_info(options: KnnMoeOptions, diagnostics: dict | None) -> dict:
    """The results JSON's `config.knnmoe` (options, and the eval diagnostics, also logged and written where asked);
    shared with `vllm-knnmoe`."""
    info = {"options": vars(options).copy()}
    if diagnostics is not None:
        info["diagnostics"] = diagnostics
        for layer, d in diagnostics.items():
            log.info("kNN-MoE layer %s: mean lambda %.3f, top-k changed %.1f%% of %d tokens", layer,
                     d["mean_lambda"], 100 * d["topk_changed"], d["tokens"])
        if options.diagnostics:
            Path(options.diagnostics).write_text(json.dumps(diagnostics, indent=2))
    return info
