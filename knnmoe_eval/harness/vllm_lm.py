"""`vllm-knnmoe`: lm-eval's `vllm` model with kNN-MoE routing, for evaluations at serving speed.

    lm_eval --model vllm-knnmoe --model_args pretrained=M,memory=memories/X --tasks medmcqa

Every `vllm` model_arg works as before (the rest go to vLLM's engine, as with `vllm`); ours have the names,
defaults and checks of `hf-knnmoe` (`options.py`). Memories are built by `hf-knnmoe` (mode=build); there is no
build mode here. The routing runs inside vLLM's workers (`vllm_worker.py`): this class starts the engine with
that worker extension, attaches the memory there (checked against the model's router fingerprints and shapes)
and runs one warm-up token to check that every router's op ran, all before lm-eval's first request.

The engine runs compiled, with vLLM's CUDA graphs captured piecewise: the routers were built by our vLLM plugin
(`vllm_plugin.py`) around the op `knnmoe::route`, and this class adds that op to `compilation_config.splitting_ops`
(with vLLM's default attention ops, which an explicit list replaces, and FusedMoE's op where the router runs
inside it), so the search runs eager between captured graphs. Imposed or refused:
- cudagraph_mode=PIECEWISE (or NONE, or enforce_eager=True, if asked); the FULL modes are refused: they capture
  the splitting ops too, and a faiss search is a host call that no CUDA graph can replay;
- one engine per memory: each `vllm-knnmoe` starts its own engine, so its prefix cache only ever holds states
  computed under its own memory.
Data parallelism (`data_parallel_size` > 1) is refused: lm-eval then starts a fresh engine inside a Ray task for
every request batch and generates there at once (`VLLM._model_generate`), so no call of ours reaches those engines
to attach the memory and check it: they would route stock.
Tensor parallelism attaches it in every worker (each searches its own copy).
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import fields

from lm_eval.api.registry import register_model
from lm_eval.models.vllm_causallms import VLLM
from vllm import SamplingParams, TokensPrompt
from vllm.config import CompilationConfig, CUDAGraphMode
from vllm.engine.arg_utils import EngineArgs

from ..core.hub import resolve_memory
from ..core.memory import MANIFEST_SHA256, read_manifest
from ..core.options import split_model_args
from ..core.retrieval import publish_diagnostics
from ..errors import KnnMoeError
from .vllm_plugin import ENGINE_KEY, FUSED_MOE_OPS, GATE_INSIDE_FUSED_MOE, OP

log = logging.getLogger(__name__)

_VLLM_ARGS = (set(inspect.signature(VLLM.__init__).parameters) - {"self", "kwargs"}) | {
    f.name for f in fields(EngineArgs)
}
WORKER_EXTENSION = "knnmoe_eval.harness.vllm_worker.KnnMoeWorkerExtension"


@register_model("vllm-knnmoe")
class KnnMoeVLLM(VLLM):
    def __init__(self, pretrained, **kwargs):
        self.options, vllm_kwargs = split_model_args(kwargs, passthrough=_VLLM_ARGS)
        if self.options.mode == "build":
            raise KnnMoeError(
                "vllm-knnmoe only evaluates: build the memory with `lm_eval --model hf-knnmoe --model_args "
                f"pretrained={pretrained},mode=build,memory={self.options.memory} --tasks <build task>`, then evaluate "
                "it here with mode=eval"
            )
        source = resolve_memory(self.options.memory, self.options.memory_revision)  # a local directory, or a Hub repo
        # a missing or incomplete memory fails before the engine loads
        self.memory_source = {**source.record(), MANIFEST_SHA256: read_manifest(source.path)[MANIFEST_SHA256]}
        if int(vllm_kwargs.get("data_parallel_size", 1)) > 1:
            raise KnnMoeError(
                "vllm-knnmoe does not support data_parallel_size > 1: lm-eval then starts a new engine inside a Ray "
                "task for every batch of requests and generates there at once, so the memory is never attached in "
                "those engines (they would route stock). Use tensor_parallel_size, or one run per GPU "
                "(CUDA_VISIBLE_DEVICES=i, each on its share of the task)"
            )
        if vllm_kwargs.get("worker_extension_cls"):
            raise KnnMoeError("vllm-knnmoe sets worker_extension_cls itself; drop it from model_args")
        extra = dict(vllm_kwargs.pop("additional_config", None) or {})
        extra[ENGINE_KEY] = {"route": OP}  # switches the plugin's routers on (and keys vLLM's compile cache)
        if not vllm_kwargs.get("enforce_eager"):
            vllm_kwargs["compilation_config"] = piecewise_config(
                vllm_kwargs.get("compilation_config"), _model_type(pretrained, vllm_kwargs))
        super().__init__(pretrained, worker_extension_cls=WORKER_EXTENSION, additional_config=extra, **vllm_kwargs)
        self._rpc("knnmoe_attach", {**vars(self.options), "memory": str(source.path)})  # workers read the download
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
        return {"knnmoe": {"options": vars(self.options).copy(), "memory": self.memory_source,
                           "diagnostics": publish_diagnostics(self.options, diag)}}


def _model_type(pretrained: str, vllm_kwargs: dict) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(pretrained, trust_remote_code=bool(vllm_kwargs.get("trust_remote_code")),
                                      revision=vllm_kwargs.get("revision")).model_type


def piecewise_config(user, model_type: str) -> CompilationConfig:
    """The user's compilation_config (None, a mode number, a dict or its JSON, a CompilationConfig) with our op
    among the splitting ops and CUDA graphs piecewise; a FULL cudagraph_mode is refused."""
    if isinstance(user, str):
        user = int(user) if user.strip().isdigit() else json.loads(user)
    if user is None or isinstance(user, int):
        config = CompilationConfig() if user is None else CompilationConfig(mode=user)
    elif isinstance(user, dict):
        config = CompilationConfig(**user)
    elif isinstance(user, CompilationConfig):
        config = user
    else:
        raise KnnMoeError(f"compilation_config must be a dict, a mode number or a CompilationConfig, not {user!r}")
    mode = config.cudagraph_mode
    if mode is None:
        config.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif mode.has_full_cudagraphs():
        raise KnnMoeError(
            f"vllm-knnmoe cannot run cudagraph_mode={mode.name}: full CUDA graphs capture the splitting ops too, "
            f"and {OP} (a faiss search, a host call) cannot be replayed from a graph. Use cudagraph_mode=PIECEWISE "
            "(the default of vllm-knnmoe: everything between the searches is captured) or NONE"
        )
    ops = list(config.splitting_ops) if config.splitting_ops is not None else [
        # what vLLM itself splits at when the list is left unset (CompilationConfig.set_splitting_ops_for_v1)
        *CompilationConfig._attention_ops, "vllm::unified_kv_cache_update", "vllm::unified_mla_kv_cache_update"]
    ops += [OP] + (list(FUSED_MOE_OPS) if model_type in GATE_INSIDE_FUSED_MOE else [])
    config.splitting_ops = list(dict.fromkeys(ops))
    return config
