"""The family table: per `config.model_type`, where its router is and which gating rule it runs (peft's shape).

One `Family` entry per family says
- which module class is the router and where its linear map lives (`router_class`, `weight`, `bias`),
- how the logits z are computed from the flattened router input (`logits`, from `gating.py`),
- the gating rule that turns (possibly mixed) logits into the experts' weights and ids (`rule`, from `gating.py`),
- what the router returns (`returns`: (z, weights, experts), Llama 4's (scores, z), or DBRX's bare z whose gating
  lives in the MoE block), which extra arguments the MoE block passes it (`args`), and how the experts are called
  with every expert selected (`dense_experts`, for `grad=dense`),
- and, for the families `vllm-knnmoe` runs, where vLLM keeps the router under a decoder layer (`vllm_router`).

Adding a family is one row here, plus a function in `gating.py` when its gating rule is new. `routers.py` finds the
routers of a loaded model from this table; nothing else in the package names a family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import KnnMoeError
from .gating import (
    BLOCK_SOFTMAX_TOPK_PNORM, COHERE2, SIGMOID_BIAS_TOPK, SIGMOID_BIAS_TOPK_SCALED, SIGMOID_GROUP_TOPK,
    SOFTMAX_BIAS_TOPK, SOFTMAX_BIAS_TOPK_SCALED, SOFTMAX_GROUP_TOPK, SOFTMAX_TOPK, SOFTMAX_TOPK_INPUT_DTYPE,
    SOFTMAX_TOPK_RENORM, SOFTMAX_TOPK_RENORM_FP32, SPARSEMIXER, TOPK_SIGMOID, TOPK_SOFTMAX, TOPK_SOFTMAX_FP32, Logits,
    Rule, linear, linear_fp32, linear_fp32_autocast_off, linear_fp32_if_fp32_weight, linear_in_weight_dtype,
    linear_then_fp32, logits_only, logits_weights_experts, scores_and_logits,
)

TESTED_TRANSFORMERS = "5.24"  # the transformers release every adapter was restated from and tested with


def fused_experts_dense(experts: nn.Module, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """transformers' fused experts, `experts(h, top_k_index, top_k_weights)`, with all E experts selected."""
    all_experts = torch.arange(p.shape[-1], device=p.device).expand(p.shape[0], -1)
    return experts.forward(h, all_experts, p.to(h.dtype))


def llama4_experts_dense(experts: nn.Module, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Llama 4's experts take every expert's copy of the tokens, scaled by its score, stacked expert-major."""
    return experts.forward(h.repeat(p.shape[-1], 1) * p.to(h.dtype).transpose(0, 1).reshape(-1, 1))


def no_args(block: nn.Module) -> tuple:
    return ()


@dataclass(frozen=True)
class Family:
    name: str
    router_class: str  # class name of the router module in transformers
    rule: Rule
    logits: Logits = linear
    weight: str = "weight"  # the router's linear map, relative to the router module
    bias: str | None = None  # its bias, if the logits use one
    returns: Callable = logits_weights_experts  # (z, select) -> what the stock router returns
    args: Callable[[nn.Module], tuple] = no_args  # MoE block -> the extra arguments it passes its router
    top_k_on_block: bool = False  # top_k lives on the MoE block (gating there), not on the router
    dense_experts: Callable = fused_experts_dense  # (experts, h, p) -> experts' output with every expert at p
    # vLLM (vllm/model_executor/models/<family>.py, 0.32) keeps each MoE block's router as a `GateLinear` whose
    # logits its FusedMoE gates with the same rule: its path under a decoder layer, None where vllm-knnmoe is untested
    vllm_router: str | None = None


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("olmoe", "OlmoeTopKRouter", SOFTMAX_TOPK, vllm_router="mlp.gate"),
    Family("flex_olmo", "FlexOlmoTopKRouter", SOFTMAX_TOPK),
    Family("qwen2_moe", "Qwen2MoeTopKRouter", SOFTMAX_TOPK, vllm_router="mlp.gate"),
    Family("qwen3_moe", "Qwen3MoeTopKRouter", SOFTMAX_TOPK, vllm_router="mlp.gate"),
    Family("qwen3_next", "Qwen3NextTopKRouter", SOFTMAX_TOPK),
    Family("qwen3_5_moe", "Qwen3_5MoeTopKRouter", SOFTMAX_TOPK_RENORM),
    Family("hunyuan_v1_moe", "HunYuanMoEV1Gate", SOFTMAX_TOPK_RENORM, logits=linear_fp32_if_fp32_weight,
           weight="wg.weight"),
    Family("mixtral", "MixtralTopKRouter", SOFTMAX_TOPK_RENORM_FP32, vllm_router="block_sparse_moe.gate"),
    Family("minimax", "MiniMaxTopKRouter", SOFTMAX_TOPK_RENORM_FP32),
    Family("jamba", "JambaTopKRouter", SOFTMAX_TOPK_INPUT_DTYPE),
    Family("gpt_oss", "GptOssTopKRouter", TOPK_SOFTMAX, bias="bias", vllm_router="mlp.router"),
    Family("granitemoe", "GraniteMoeTopKRouter", TOPK_SOFTMAX_FP32, logits=linear_then_fp32),
    Family("granitemoeshared", "GraniteMoeSharedTopKRouter", TOPK_SOFTMAX_FP32, logits=linear_then_fp32),
    Family("granitemoehybrid", "GraniteMoeHybridTopKRouter", TOPK_SOFTMAX_FP32, logits=linear_then_fp32),
    Family("cohere2_moe", "Cohere2MoeTopKRouter", COHERE2),
    Family("deepseek_v2", "DeepseekV2TopkRouter", SOFTMAX_GROUP_TOPK, logits=linear_fp32),
    Family("deepseek_v3", "DeepseekV3TopkRouter", SIGMOID_GROUP_TOPK, logits=linear_fp32),
    Family("glm4_moe", "Glm4MoeTopkRouter", SIGMOID_GROUP_TOPK, logits=linear_fp32),
    Family("glm4_moe_lite", "Glm4MoeLiteTopkRouter", SIGMOID_GROUP_TOPK, logits=linear_fp32),
    Family("dots1", "Dots1TopkRouter", SIGMOID_GROUP_TOPK, logits=linear_fp32),
    Family("exaone_moe", "ExaoneMoeTopkRouter", SIGMOID_GROUP_TOPK, logits=linear_fp32),
    Family("solar_open", "SolarOpenTopkRouter", SIGMOID_GROUP_TOPK, logits=linear_fp32),
    Family("ernie4_5_moe", "Ernie4_5_MoeTopKRouter", SOFTMAX_BIAS_TOPK, logits=linear_fp32_autocast_off),
    Family("longcat_flash", "LongcatFlashTopkRouter", SOFTMAX_BIAS_TOPK_SCALED, logits=linear_fp32,
           weight="classifier.weight"),
    Family("minimax_m2", "MiniMaxM2TopKRouter", SIGMOID_BIAS_TOPK, logits=linear_in_weight_dtype,
           args=lambda block: (block.e_score_correction_bias,)),
    Family("lfm2_moe", "Lfm2MoeTopKRouter", SIGMOID_BIAS_TOPK_SCALED,
           args=lambda block: (block.expert_bias if block.use_expert_bias else None,)),
    Family("phimoe", "PhimoeTopKRouter", SPARSEMIXER),
    Family("llama4", "Llama4Router", TOPK_SIGMOID, returns=scores_and_logits, dense_experts=llama4_experts_dense),
    Family("dbrx", "DbrxRouter", BLOCK_SOFTMAX_TOPK_PNORM, weight="layer.weight", returns=logits_only,
           top_k_on_block=True),
]}
# model types whose causal LM is another family's text model (multimodal checkpoints loaded for text)
ALIASES = {"llama4_text": "llama4", "qwen3_5_moe_text": "qwen3_5_moe"}

def supported() -> list[str]:
    return sorted([*FAMILIES, *ALIASES])


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    model_type = ALIASES.get(model_type, model_type)
    if model_type not in FAMILIES:
        raise KnnMoeError(
            f"kNN-MoE does not support model_type {model_type!r}: it needs a Mixture-of-Experts model whose routers "
            f"it knows how to hook. Supported families: {', '.join(supported())}."
        )
    return FAMILIES[model_type]
