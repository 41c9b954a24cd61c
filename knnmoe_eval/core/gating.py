"""The gating math of every family, restated from transformers op for op: logits, sparse rules, dense rules, outputs.

A router computes logits z (n, E) from its flattened input h (n, d) and gates them into (weights (n, k), expert ids
(n, k)). kNN-MoE mixes z and must then gate the mixed logits exactly as the family does, so each rule below restates
one transformers router's forward after its logits (tested with transformers 5.24). Rules shared by several families
are written once; `families.py` says which family uses which. Pure torch: a rule reads only the router's (or its MoE
block's) configuration attributes, through the site it is handed.

Tokens that kNN-MoE leaves alone (lambda = 0) never go through these functions: the hook hands them the stock
router's own output (`hooks.py`), so the rules need to be faithful (the same experts, weights within rounding), not
bit-identical on every CPU kernel; `routers.RouterSite.check` verifies that at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .routers import RouterSite

Selection = tuple[torch.Tensor, torch.Tensor]  # (weights (n, k), expert ids (n, k)) as the MoE block uses them
# (h (n, d) router input, W (E, d), b (E,) or None) -> z (n, E)
Logits = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# -- logits: how a router computes z from its input -------------------------------------------------------------
def linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h, w, b)


def linear_fp32(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """DeepSeek and its kin: input and weight upcast to fp32."""
    return F.linear(h.type(torch.float32), w.type(torch.float32))


def linear_fp32_autocast_off(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """ERNIE 4.5: upcast to fp32 with autocast off, so that it stays fp32 under autocast too."""
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(h.float(), w.float())


def linear_then_fp32(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Granite: logits in the input's dtype, then upcast."""
    return F.linear(h, w).float()


def linear_in_weight_dtype(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """MiniMax-M2: the input cast to the router weight's dtype."""
    return F.linear(h.to(w.dtype), w)


def linear_fp32_if_fp32_weight(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Hunyuan: an fp32 router weight upcasts the input."""
    return F.linear(h.float() if w.dtype == torch.float32 else h, w)


# -- gating rules: (site, z, input dtype, block args) -> (weights, experts) ----------------------------------------
# Each restates a transformers router's forward after its logits, op for op. `dtype` is the router input's dtype
# (some cast their weights to it); `args` are the extra arguments the MoE block passes its router.


def _cast(x: torch.Tensor, cast: str | None, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights cast to the logits' dtype, the router input's, or left as computed."""
    if cast == "logits":
        return x.to(z.dtype)
    return x.to(dtype) if cast == "input" else x


def _flag(site: "RouterSite", renorm: bool | str) -> bool:
    return bool(getattr(site.module, renorm)) if isinstance(renorm, str) else renorm


def softmax_topk(site, z, dtype, args, *, renorm: bool | str, cast: str | None, upcast_first: bool = False):
    """fp32 softmax over all experts -> top-k (-> renormalise). OLMoE, Qwen-MoE, Mixtral, Jamba, Hunyuan, ...

    `renorm`: True, False or the router attribute that says (`norm_topk_prob`); `cast`: the weights are cast to
    the logits' dtype, the input's, or left fp32; `upcast_first`: `softmax(z.float())` (Mixtral) instead of
    `softmax(z, dtype=float)`."""
    probs = F.softmax(z.float(), dim=-1) if upcast_first else F.softmax(z, dtype=torch.float, dim=-1)  # (n, E)
    top, experts = torch.topk(probs, site.top_k, dim=-1)  # (n, k)
    if _flag(site, renorm):
        top /= top.sum(dim=-1, keepdim=True)
    return _cast(top, cast, z, dtype), experts


def topk_softmax(site, z, dtype, args, *, fp32: bool, cast: str | None):
    """top-k on the raw logits -> softmax over the k selected. GPT-OSS (in the logits' dtype), Granite (fp32)."""
    top, experts = torch.topk(z, site.top_k, dim=-1)  # (n, k)
    return _cast(F.softmax(top, dim=-1, dtype=torch.float if fp32 else top.dtype), cast, z, dtype), experts


def cohere2_topk(site, z, dtype, args):
    """Cohere2-MoE: top-k on the logits -> softmax over them, or sigmoid (-> renormalise), per the config."""
    r = site.module
    top, experts = torch.topk(z, site.top_k, dim=-1)
    if r.expert_selection_fn == "softmax":
        top = F.softmax(top, dim=1, dtype=torch.float)
    else:
        top = F.sigmoid(top)
        if r.norm_topk_prob:
            top = top / torch.sum(top, dim=-1, keepdims=True)
    return top.to(dtype), experts


def _group_mask(site, scores_for_choice: torch.Tensor, group_score) -> torch.Tensor:
    """(n, E) bool: the experts of the `topk_group` best of `n_group` groups (DeepSeek's group-limited routing)."""
    r = site.module
    e = scores_for_choice.shape[-1]
    group_scores = group_score(scores_for_choice.view(-1, r.num_group, e // r.num_group))  # (n, n_group)
    group_idx = torch.topk(group_scores, k=r.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, r.num_group, e // r.num_group).reshape(-1, e).bool()


def sigmoid_group_topk(site, z, dtype, args):
    """DeepSeek-V3 and kin (GLM-4.5, dots.llm1, EXAONE-MoE, Solar-Open): sigmoid -> + correction bias ->
    group-limited top-k (groups ranked by their top-2 sum) -> the sigmoid scores of the chosen -> normalise
    (iff `norm_topk_prob`) -> x `routed_scaling_factor`. The bias and groups steer selection only."""
    r = site.module
    scores = z.sigmoid()  # (n, E)
    scores_for_choice = scores + r.e_score_correction_bias
    mask = _group_mask(site, scores_for_choice, lambda g: g.topk(2, dim=-1)[0].sum(dim=-1))
    scores_for_choice = scores_for_choice.masked_fill(~mask, float("-inf"))
    experts = torch.topk(scores_for_choice, k=site.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, experts)
    if r.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * r.routed_scaling_factor, experts


def softmax_group_topk(site, z, dtype, args):
    """DeepSeek-V2: fp32 softmax -> top-k, greedy or group-limited (groups ranked by their best expert) ->
    x `routed_scaling_factor`, never renormalised."""
    r = site.module
    scores = z.softmax(dim=-1, dtype=torch.float32)
    if r.topk_method == "group_limited_greedy":
        scores = scores.masked_fill(~_group_mask(site, scores, lambda g: g.max(dim=-1).values), 0.0)
    weights, experts = torch.topk(scores, k=site.top_k, dim=-1, sorted=False)
    return weights * r.routed_scaling_factor, experts


def softmax_bias_topk(site, z, dtype, args):
    """ERNIE 4.5: fp32 softmax -> + correction bias -> top-k -> the softmax of the chosen -> renormalise
    (denominator clamped at `norm_min`) -> input dtype."""
    r = site.module
    with torch.autocast(z.device.type, enabled=False):
        probs = F.softmax(z, dim=1, dtype=torch.float)
        _, experts = torch.topk(r.moe_statics(probs), site.top_k, dim=-1)
        weights = torch.gather(probs, dim=-1, index=experts)
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=r.norm_min)
    return weights.to(dtype), experts


def softmax_bias_topk_scaled(site, z, dtype, args):
    """LongCat-Flash: softmax -> + correction bias -> top-k (zero-compute experts included) -> the softmax of
    the chosen x `routed_scaling_factor`, never renormalised."""
    r = site.module
    scores = z.softmax(dim=-1)
    with torch.no_grad():
        choice = scores.view(-1, r.n_routed_experts) + r.e_score_correction_bias.unsqueeze(0)
        experts = torch.topk(choice, k=site.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, experts) * r.routed_scaling_factor
    return weights.to(z.dtype), experts


def sigmoid_bias_topk(site, z, dtype, args):
    """MiniMax-M2: fp32 sigmoid -> + the correction bias its MoE block passes -> top-k -> renormalise."""
    (bias,) = args
    weights = F.sigmoid(z.float())
    experts = torch.topk(weights + bias, site.top_k, dim=-1, sorted=False)[1]
    top = weights.gather(1, experts)
    top /= top.sum(dim=-1, keepdim=True)
    return top, experts


def sigmoid_bias_topk_scaled(site, z, dtype, args):
    """LFM2-MoE: sigmoid -> (+ the expert bias its MoE block passes, if any) -> top-k -> normalise (iff
    `norm_topk_prob`, +1e-6) -> x `routed_scaling_factor`."""
    r = site.module
    (bias,) = args
    weights = z.sigmoid()
    if r.use_expert_bias:
        _, experts = torch.topk(weights + bias, k=site.top_k, dim=-1)
        weights = torch.gather(weights, dim=1, index=experts).type_as(z)
    else:
        weights, experts = torch.topk(weights, k=site.top_k, dim=-1)
    if r.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
    return weights * r.routed_scaling_factor, experts


def sparsemixer(site, z, dtype, args):
    """Phi-3.5-MoE's sparsemixer at inference (top-2): the best expert, weighted by a softmax over the experts
    within 2 x jitter_eps (relative) of it; then the best of the rest, likewise without the first."""
    eps = site.module.router_jitter_noise

    def pick(scores: torch.Tensor) -> Selection:
        with torch.no_grad():
            threshold, best = scores.max(dim=-1, keepdim=True)
            factor = z.abs().clamp(min=threshold)
            far = ((threshold - z) / factor) > (2 * eps)
        return torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1).gather(dim=-1, index=best), best

    w1, e1 = pick(z)
    w2, e2 = pick(torch.scatter(z, -1, e1, float("-inf")))
    return torch.concat((w1, w2), dim=-1), torch.concat((e1, e2), dim=-1)


def topk_sigmoid(site, z, dtype, args):
    """Llama 4: top-k on the logits -> sigmoid of the chosen (the router spreads them over all experts)."""
    top, experts = torch.topk(z, site.top_k, dim=1)
    return torch.nn.functional.sigmoid(top.float()).to(z.dtype), experts


def block_softmax_topk_pnorm(site, z, dtype, args):
    """DBRX (gating in the MoE block): softmax in the logits' dtype -> top-k -> divided by its p-norm
    (p = `moe_normalize_expert_weights`, none if None)."""
    b = site.block
    probs = torch.nn.functional.softmax(z, dim=1, dtype=z.dtype)
    top, experts = torch.topk(probs, b.top_k, dim=-1)
    if b.moe_normalize_expert_weights is not None:
        top = top / torch.norm(top, p=b.moe_normalize_expert_weights, dim=-1, keepdim=True)
    return top, experts


# -- dense counterparts for grad=dense: the same rule with every expert selected (k = E) ---------------------------
# Selection-only steps (correction bias, groups, sparsemixer's masks) drop out; weighting steps stay. fp32, (n, E).
def dense_softmax(site, z, *, scale: str | None = None):
    p = F.softmax(z.float(), dim=-1)
    return p * getattr(site.module, scale) if scale else p


def dense_sigmoid(site, z, *, norm: bool | str, scale: str | None = None, eps: float = 0.0):
    s = torch.sigmoid(z.float())
    if _flag(site, norm):
        s = s / (s.sum(dim=-1, keepdim=True) + eps)
    return s * getattr(site.module, scale) if scale else s


def dense_cohere2(site, z):
    r = site.module
    if r.expert_selection_fn == "softmax":
        return dense_softmax(site, z)
    return dense_sigmoid(site, z, norm="norm_topk_prob")


def dense_softmax_pnorm(site, z):
    p = F.softmax(z.float(), dim=-1)
    norm = site.block.moe_normalize_expert_weights
    return p if norm is None else p / torch.norm(p, p=norm, dim=-1, keepdim=True)



@dataclass(frozen=True)
class Rule:
    """A gating rule: the sparse gating, and its dense counterpart for grad=dense."""

    select: Callable  # (site, z, dtype, args) -> Selection
    dense: Callable  # (site, z) -> (n, E) fp32


SOFTMAX_TOPK = Rule(partial(softmax_topk, renorm="norm_topk_prob", cast="logits"), dense_softmax)
SOFTMAX_TOPK_RENORM = Rule(partial(softmax_topk, renorm=True, cast="logits"), dense_softmax)
SOFTMAX_TOPK_RENORM_FP32 = Rule(partial(softmax_topk, renorm=True, cast=None, upcast_first=True), dense_softmax)
SOFTMAX_TOPK_INPUT_DTYPE = Rule(partial(softmax_topk, renorm=False, cast="input"), dense_softmax)
TOPK_SOFTMAX = Rule(partial(topk_softmax, fp32=False, cast=None), dense_softmax)
TOPK_SOFTMAX_FP32 = Rule(partial(topk_softmax, fp32=True, cast="input"), dense_softmax)
COHERE2 = Rule(cohere2_topk, dense_cohere2)
SIGMOID_GROUP_TOPK = Rule(sigmoid_group_topk,
                          partial(dense_sigmoid, norm="norm_topk_prob", scale="routed_scaling_factor", eps=1e-20))
SOFTMAX_GROUP_TOPK = Rule(softmax_group_topk, partial(dense_softmax, scale="routed_scaling_factor"))
SOFTMAX_BIAS_TOPK = Rule(softmax_bias_topk, dense_softmax)
SOFTMAX_BIAS_TOPK_SCALED = Rule(softmax_bias_topk_scaled, partial(dense_softmax, scale="routed_scaling_factor"))
SIGMOID_BIAS_TOPK = Rule(sigmoid_bias_topk, partial(dense_sigmoid, norm=True))
SIGMOID_BIAS_TOPK_SCALED = Rule(sigmoid_bias_topk_scaled,
                                partial(dense_sigmoid, norm="norm_topk_prob", scale="routed_scaling_factor", eps=1e-6))
SPARSEMIXER = Rule(sparsemixer, dense_softmax)
TOPK_SIGMOID = Rule(topk_sigmoid, partial(dense_sigmoid, norm=False))
BLOCK_SOFTMAX_TOPK_PNORM = Rule(block_softmax_topk_pnorm, dense_softmax_pnorm)


# -- what a router returns, from its (mixed) logits and their gating ----------------------------------------------
def logits_weights_experts(z: torch.Tensor, select: Callable[[], Selection]):
    return (z, *select())


def scores_and_logits(z: torch.Tensor, select: Callable[[], Selection]):
    """Llama 4: every expert's score, sigmoid(-inf) = 0 for the unselected, then the logits."""
    weights, experts = select()
    return torch.zeros_like(z).scatter_(1, experts, weights), z


def logits_only(z: torch.Tensor, select: Callable[[], Selection]):
    return z

