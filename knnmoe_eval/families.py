"""Per-family router knowledge: where the routers are and how each family turns logits into (scores, indices).

A hook replaces a router's forward and must hand the MoE block the same (scores, indices) the stock router
would compute from the same logits, bit for bit; so each family's gating rule is restated here op for op from
transformers 5.x (`*TopKRouter.forward`). Everything family-specific lives in this file, keyed by
`config.model_type` like peft's per-architecture mappings. A family not listed here is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import KnnMoeError

Gate = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def softmax_topk(router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OLMoE, Qwen2-MoE, Qwen3-MoE: fp32 softmax over all experts, top-k, renormalize iff `norm_topk_prob`."""
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    top, indices = torch.topk(probs, router.top_k, dim=-1)
    if router.norm_topk_prob:
        top /= top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), indices


def softmax_topk_renorm(router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral: fp32 softmax, top-k, always renormalized; scores stay fp32 (transformers does not cast back)."""
    probs = F.softmax(logits.float(), dim=-1)
    top, indices = torch.topk(probs, router.top_k, dim=-1)
    top /= top.sum(dim=-1, keepdim=True)
    return top, indices


def topk_softmax(router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS: top-k on the raw logits, softmax over the k selected only, in the logits' dtype."""
    top, indices = torch.topk(logits, router.top_k, dim=-1)
    return F.softmax(top, dim=1, dtype=top.dtype), indices


@dataclass(frozen=True)
class Family:
    name: str
    router_class: str  # class name of the router module in transformers 5.x
    gate: Gate
    renormalizes: Callable[[nn.Module], bool]  # whether unselected experts get zero gradient under the paper's step


FAMILIES: dict[str, Family] = {
    "olmoe": Family("olmoe", "OlmoeTopKRouter", softmax_topk, lambda r: bool(r.norm_topk_prob)),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeTopKRouter", softmax_topk, lambda r: bool(r.norm_topk_prob)),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeTopKRouter", softmax_topk, lambda r: bool(r.norm_topk_prob)),
    "mixtral": Family("mixtral", "MixtralTopKRouter", softmax_topk_renorm, lambda r: True),
    "gpt_oss": Family("gpt_oss", "GptOssTopKRouter", topk_softmax, lambda r: True),
}


@dataclass(frozen=True)
class RouterSite:
    """One MoE layer's router, as found in a loaded model."""

    layer: int  # decoder layer index (dense layers of mixed models are skipped, so ids may have gaps)
    name: str  # module path, e.g. "model.layers.3.mlp.gate"
    module: nn.Module  # the router; in a vLLM model a VllmRouter view of its gate
    family: Family

    @property
    def num_experts(self) -> int:
        return self.module.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.module.weight.shape[1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Router logits from the flattened router input, computed as the stock router does."""
        return F.linear(h, self.module.weight, getattr(self.module, "bias", None))

    def gate(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.family.gate(self.module, logits)


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise KnnMoeError(
            f"kNN-MoE does not support model_type {model_type!r}: it needs a Mixture-of-Experts model whose routers "
            f"it knows how to hook. Supported families: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[model_type]


def _layer_index(name: str) -> int:
    parts = name.split(".")
    for before, part in zip(parts, parts[1:]):
        if before == "layers" and part.isdigit():
            return int(part)
    raise KnnMoeError(f"cannot tell which decoder layer the router {name!r} belongs to (no 'layers.<i>' in its path)")


def find_routers(model: nn.Module) -> list[RouterSite]:
    """Every MoE router of `model`, ordered by layer; raises if the family is unsupported or none is found."""
    family = family_of(model)
    sites = [
        RouterSite(_layer_index(name), name, module, family)
        for name, module in model.named_modules()
        if type(module).__name__ == family.router_class
    ]
    if not sites:
        raise KnnMoeError(
            f"no {family.router_class} modules found in this {family.name} model: its MoE layers may have been "
            "replaced (e.g. by a hub kernel). Load the model without kernels (use_kernels=False)."
        )
    return sorted(sites, key=lambda s: s.layer)


# -- vLLM --------------------------------------------------------------------------------------------------
# vLLM (vllm/model_executor/models/<family>.py, 0.32) keeps each MoE block's router as a `GateLinear` (a
# ReplicatedLinear returning (logits, bias)) whose logits its FusedMoE gates with the same rule as transformers;
# the router's path under a decoder layer, per family. Its k lives in the config, not on the module.
VLLM_ROUTERS: dict[str, str] = {
    "olmoe": "mlp.gate",
    "qwen2_moe": "mlp.gate",
    "qwen3_moe": "mlp.gate",
    "mixtral": "block_sparse_moe.gate",
    "gpt_oss": "mlp.router",
}


@dataclass(frozen=True)
class VllmRouter:
    """The router a `RouterSite` describes, for a vLLM gate: its weights, and k and renormalisation from the config."""

    weight: torch.Tensor  # (E, d), shared with the vLLM module
    bias: torch.Tensor | None
    top_k: int
    norm_topk_prob: bool


def _vllm_gate_weights(gate: nn.Module, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gate's (weight (E, d), bias (E,) or None). vLLM's CPU backend packs small linear layers for its own
    kernels and leaves `weight` empty; the weights are then read back through the gate itself: its logits of the
    zero vector are the bias, of each unit vector a column of the weight (exact: one product by 1, zeros added)."""
    bias = getattr(gate, "bias", None)
    if gate.weight.numel():
        return gate.weight, bias
    probe = torch.cat([torch.zeros(1, hidden_size), torch.eye(hidden_size)]).to(gate.weight.device, gate.weight.dtype)
    with torch.no_grad():
        out = gate(probe)
    logits = (out[0] if isinstance(out, tuple) else out).float()  # (1 + d, E)
    return (logits[1:] - logits[0]).T.contiguous(), None if bias is None else logits[0]


def find_vllm_routers(model: nn.Module) -> list[RouterSite]:
    """Every MoE router of a vLLM model (`RouterSite.name` is the gate module's path), ordered by layer."""
    family = family_of(model)
    if family.name not in VLLM_ROUTERS:
        raise KnnMoeError(
            f"vllm-knnmoe does not know where vLLM keeps the {family.name} router. "
            f"Supported families: {', '.join(sorted(VLLM_ROUTERS))}."
        )
    cfg = model.config
    top_k = int(cfg.num_experts_per_tok)
    suffix = "." + VLLM_ROUTERS[family.name]
    norm = bool(getattr(cfg, "norm_topk_prob", False))
    sites = [
        RouterSite(_layer_index(name), name, VllmRouter(*_vllm_gate_weights(module, cfg.hidden_size), top_k, norm),
                   family)
        for name, module in model.named_modules()
        if name.endswith(suffix) and hasattr(module, "weight")
    ]
    if not sites:
        raise KnnMoeError(f"no '*{suffix}' router modules found in this vLLM {family.name} model")
    return sorted(sites, key=lambda s: s.layer)
