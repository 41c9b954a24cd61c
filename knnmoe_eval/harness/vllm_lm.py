"""`vllm-knnmoe`: lm-eval's `vllm` model with kNN-MoE routing, for evaluations at serving speed.

    lm_eval --model vllm-knnmoe --model_args pretrained=M,memory=memories/X --tasks medmcqa

Every `vllm` model_arg works as before (the rest go to vLLM's engine, as with `vllm`); ours have the names,
defaults and checks of `hf-knnmoe` (`options.py`). Memories are built by `hf-knnmoe` (mode=build); there is no
build mode here. The routing runs inside vLLM's workers (`vllm_worker.py`): this class starts the engine with
that worker extension, attaches the memory there (checked against the model's router fingerprints and shapes)
and runs one warm-up token to check that every router hook fired, all before lm-eval's first request.

Two vLLM settings are imposed:
- enforce_eager: a faiss search cannot run inside a captured CUDA graph or a compiled graph;
- one engine per memory: each `vllm-knnmoe` starts its own engine, so its prefix cache only ever holds states
  computed under its own memory.
Data parallelism (`data_parallel_size` > 1) is refused: lm-eval starts those engines inside Ray tasks, where the
memory cannot be attached. Tensor parallelism attaches it in every worker (each searches its own copy).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import fields

from lm_eval.api.registry import register_model
from lm_eval.models.vllm_causallms import VLLM
from vllm import SamplingParams, TokensPrompt
from vllm.engine.arg_utils import EngineArgs

from ..core.hub import resolve_memory
from ..core.memory import MANIFEST_SHA256, read_manifest
from ..core.options import split_model_args
from ..core.retrieval import report
from ..errors import KnnMoeError

log = logging.getLogger(__name__)

_VLLM_ARGS = (set(inspect.signature(VLLM.__init__).parameters) - {"self", "kwargs"}) | {
    f.name for f in fields(EngineArgs)
}
WORKER_EXTENSION = "knnmoe_eval.harness.vllm_worker.KnnMoeWorkerExtension"


@register_model("vllm-knnmoe")
class KnnMoeVLLM(VLLM):
    def __init__(self, pretrained, **kwargs):
        self.knn, vllm_kwargs = split_model_args(kwargs, passthrough=_VLLM_ARGS)
        if self.knn.mode == "build":
            raise KnnMoeError(
                "vllm-knnmoe only evaluates: build the memory with `lm_eval --model hf-knnmoe --model_args "
                f"pretrained={pretrained},mode=build,memory={self.knn.memory} --tasks <build task>`, then evaluate "
                "it here with mode=eval"
            )
        source = resolve_memory(self.knn.memory, self.knn.memory_revision)  # a local directory, or a Hub repo
        # a missing or incomplete memory fails before the engine loads
        self.memory_source = {**source.record(), MANIFEST_SHA256: read_manifest(source.path)[MANIFEST_SHA256]}
        if int(vllm_kwargs.get("data_parallel_size", 1)) > 1:
            raise KnnMoeError(
                "vllm-knnmoe does not support data_parallel_size > 1 (lm-eval runs those engines in Ray tasks, "
                "where the memory cannot be attached); use tensor_parallel_size, or one run per GPU"
            )
        if vllm_kwargs.get("worker_extension_cls"):
            raise KnnMoeError("vllm-knnmoe sets worker_extension_cls itself; drop it from model_args")
        log.warning("vllm-knnmoe: enforce_eager=True (kNN retrieval cannot run inside CUDA graphs or torch.compile)")
        super().__init__(pretrained, enforce_eager=True, worker_extension_cls=WORKER_EXTENSION,
                         **{k: v for k, v in vllm_kwargs.items() if k != "enforce_eager"})
        self._rpc("knnmoe_attach", {**vars(self.knn), "memory": str(source.path)})  # workers read the download
        self.model.generate([TokensPrompt(prompt_token_ids=[self.prefix_token_id])],
                            SamplingParams(max_tokens=1), use_tqdm=False)
        self._rpc("knnmoe_check_fired")
        self.model.collective_rpc("knnmoe_diagnostics", args=(True,))  # forget the warm-up token

    def _rpc(self, method: str, *args) -> None:
        """Call a worker method that answers an error message or None, on every worker; raise the first error."""
        errors = [e for e in self.model.collective_rpc(method, args=args) if e]
        if errors:
            raise KnnMoeError(errors[0])

    def get_model_info(self) -> dict:
        """lm-eval puts this into the results JSON's `config`: our options and the diagnostics of the first worker
        (tensor-parallel workers route the same replicated tokens)."""
        diag = self.model.collective_rpc("knnmoe_diagnostics")[0]
        return {"knnmoe": {"options": vars(self.knn).copy(), "memory": self.memory_source,
                           "diagnostics": report(self.knn, diag)}}
