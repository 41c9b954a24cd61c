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


def switch_load_balance(logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """transformers' `load_balancing_loss_func` (Switch Transformer eq. 4-6, every family here), one sequence:
    E * sum_e f_e P_e over the rows of every layer together, where f_e is the share of top-k slots (of the
    softmax) that went to expert e and P_e the mean softmax probability of e. 1 per slot when balanced (= top_k).

    logits: one (n_tokens, E) tensor per MoE layer, as its router returned them (after any hook)."""
    z = torch.cat([l.float() for l in logits])  # (layers * n_tokens, E)
    probs = F.softmax(z, dim=-1)
    selected = torch.topk(probs, top_k, dim=-1).indices  # (rows, k)
    f = torch.bincount(selected.reshape(-1), minlength=z.shape[-1]).float() / z.shape[0]  # (E,) summed over slots
    return z.shape[-1] * (f * probs.mean(0)).sum()


@dataclass(frozen=True)
class Family:
    name: str
    router_class: str  # class name of the router module in transformers 5.x
    gate: Gate
    renormalizes: Callable[[nn.Module], bool]  # whether unselected experts get zero gradient under the paper's step
    load_balance: Callable[[list[torch.Tensor], int], torch.Tensor] = switch_load_balance  # the family's aux loss


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
    module: nn.Module
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
