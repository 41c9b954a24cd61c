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
import logging
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Iterator

import lm_eval.models.huggingface as _hf
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..core.build import MemoryBuilder, read_texts
from ..core.hooks import hooked_routers
from ..core.hub import resolve_memory
from ..core.memory import MANIFEST_SHA256, load_memory
from ..core.options import split_model_args
from ..core.retrieval import Retriever
from ..core.routers import find_routers
from ..core.signature import model_signature
from ..errors import KnnMoeError
from .requests import reference_sequences
from .selective import run_selective

log = logging.getLogger(__name__)

_HF_ARGS = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


# Each causal loglikelihood batch's real row lengths, from lm-eval's `pad_and_concat` to our `_model_call`: a context
# variable, so that two models evaluating in two threads never read each other's batch.
_REAL_LENGTHS: ContextVar[list[int] | None] = ContextVar("knnmoe_real_lengths", default=None)  # None: not ours
_RECORDING = "_knnmoe_records_lengths"


def _record_padding() -> None:
    """Wrap lm-eval's `pad_and_concat` once (never unwrapped, so no thread can restore a stale one): the same result,
    and under a KnnMoeLM's loglikelihood in this context the rows' lengths noted for its next model call."""
    pad = _hf.pad_and_concat
    if getattr(pad, _RECORDING, False):
        return

    def recording(max_length, tensors, padding_side="right"):
        lengths = _REAL_LENGTHS.get()
        if lengths is not None and padding_side == "right":
            lengths[:] = [int(t.shape[-1]) for t in tensors]
        return pad(max_length, tensors, padding_side=padding_side)

    setattr(recording, _RECORDING, True)
    _hf.pad_and_concat = recording


@register_model("hf-knnmoe")
class KnnMoeLM(HFLM):
    def __init__(self, pretrained, **kwargs):
        self.options, hf_kwargs = split_model_args(kwargs, passthrough=_HF_ARGS)
        super().__init__(pretrained=pretrained, **hf_kwargs)
        self.sites = find_routers(self.model)  # unsupported family or no routers: fail before any forward
        if self.options.mode == "build":
            self._init_distributed_cpu()
            signature = model_signature(self.model, self.sites)
            self.builder = MemoryBuilder(self.model, self.sites, signature, self.options, self.rank, self.world_size)
            self.retriever = None
        else:
            source = resolve_memory(self.options.memory, self.options.memory_revision)  # a local directory, or a Hub repo
            memory = load_memory(source.path, self.options.verify)
            self.retriever = Retriever(self.model, memory, self.options, sites=self.sites)
            self.memory_source = {**source.record(), MANIFEST_SHA256: memory.manifest[MANIFEST_SHA256]}
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
        if not self._retrieve:  # a request Selective skips: the stock model
            yield
            return
        mask = None if attention_mask is None else attention_mask.reshape(-1).bool()  # padding is never searched
        with hooked_routers(self.sites, partial(self.retriever, token_mask=mask)):
            yield

    @contextmanager
    def retrieval_off(self) -> Iterator[None]:
        self._retrieve = False
        try:
            yield
        finally:
            self._retrieve = True

    def _model_call(self, inps, attn_mask=None, labels=None):
        recorded = _REAL_LENGTHS.get()
        lengths = None if not recorded else list(recorded)
        if recorded:
            recorded.clear()  # one batch's lengths serve one call
        mask = None
        if lengths is not None and len(lengths) == inps.shape[0] and max(lengths) == inps.shape[1]:
            # hf right-pads loglikelihood batches with zeros and passes no mask: the rows past each length
            mask = torch.arange(inps.shape[1], device=inps.device) < torch.tensor(lengths, device=inps.device)[:, None]
        with self._routing(mask):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """hf's, with each batch's real lengths kept for `_model_call`: it builds the right-padded batch with
        `pad_and_concat` and hands the model no mask, so the lengths are read where it pads."""
        _record_padding()
        token = _REAL_LENGTHS.set([]) if self.backend == "causal" else None
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            if token is not None:
                _REAL_LENGTHS.reset(token)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self._routing(generation_kwargs.get("attention_mask")):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.options.mode != "build":
            return self._selective(super().loglikelihood, requests, disable_tqdm)
        # build mode: the requests are the reference set; their results are the stock loglikelihoods
        sequences = reference_sequences(self, requests, self.options.labels)
        pad_id, batch = self.tokenizer.pad_token_id or 0, self._build_batch_size()
        if self.options.calibration and self.rank == 0:  # not-this-domain text: what each layer's radius stays clear of
            texts = read_texts(self.options.calibration)
            self.builder.read_calibration((self.tok_encode(t)[-self.max_length:] for t in texts), pad_id, batch)
        results = self.builder.build(sequences, pad_id, batch,
                                     barrier=self.accelerator.wait_for_everyone if self.world_size > 1 else None)
        return [results[(r.task_name, r.doc_id, r.idx)] for r in requests]

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._selective(super().generate_until, requests, disable_tqdm)

    def _selective(self, run, requests, disable_tqdm: bool) -> list:
        if self.options.selective_ppl is None and self.options.selective_fraction is None:
            return run(requests, disable_tqdm=disable_tqdm)
        results, skipped = run_selective(self, run, requests, disable_tqdm)
        self.skipped = (self.skipped or 0) + skipped
        return results

    def _build_batch_size(self) -> int:
        if isinstance(self.batch_size, int):
            return self.batch_size
        # `auto` probes inference batches; a build also holds the backward pass, so it does not carry over
        log.warning("mode=build does not support batch_size=%s; building with batch_size=8 (pass an integer)",
                    self.batch_size)
        return 8

    def get_model_info(self) -> dict:
        """lm-eval puts this into the results JSON's `config`: our options and, in eval mode, the diagnostics."""
        info = {**super().get_model_info(), "knnmoe": {"options": vars(self.options).copy()}}
        if self.retriever is not None:  # lm-eval asks for this once, after the last request: the run's report
            info["knnmoe"]["memory"] = self.memory_source  # where it came from, down to the Hub commit
            info["knnmoe"]["diagnostics"] = self.retriever.publish_diagnostics()
            # the index each layer was searched with: what `plan` made of index= for this memory's size
            info["knnmoe"]["index"] = {str(l): r.factory for l, r in self.retriever.layers.items()}
        if self.skipped is not None:
            info["knnmoe"]["selective_skipped"] = self.skipped
        return info

