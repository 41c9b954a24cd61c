"""Per-family router knowledge: where the routers are, how each computes its logits, and how it gates them.

A hook replaces a router's forward and must hand the MoE block exactly what the stock router would return from
the same logits, bit for bit; so each family's logits and gating are restated here op for op from transformers
(tested with 5.24; `TESTED_TRANSFORMERS`). Every other module talks to a `RouterSite` and never names a family.

The adapter of a family (one `Family` entry in `FAMILIES`, keyed by `config.model_type` like peft's
per-architecture mappings) says
- which module class is the router and where its linear map lives (`router_class`, `weight`),
- how the logits z are computed from the flattened router input (`logits`),
- the gating rule that turns (possibly mixed) logits into the experts' weights and ids (`rule`), and its dense
  counterpart for `grad=dense`; rules shared by several families are written once below,
- what the router returns (`returns`: (z, weights, experts), Llama 4's (scores, z), or DBRX's bare z whose
  gating lives in the MoE block), which extra arguments the MoE block passes it (`args`), and how the experts
  are called with every expert selected (`dense_experts`).

`find_routers` refuses an unknown family with the supported list, and before handing out any site runs each
router stock and through our restatement on a probe batch: a transformers release that changed a router is
refused at load, naming the family, the version and the largest difference, instead of silently drifting.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KnnMoeError

TESTED_TRANSFORMERS = "5.24"  # the transformers release every adapter below was restated from and tested with

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
    """A gating rule: the sparse gating, its dense counterpart, and whether the paper's gradient leaves every
    unselected expert's logit untouched (renormalised or gather-only weights)."""

    select: Callable  # (site, z, dtype, args) -> Selection
    dense: Callable  # (site, z) -> (n, E) fp32
    sparse_grad: Callable[["RouterSite"], bool]


def _always(value: bool):
    return lambda site: value


SOFTMAX_TOPK = Rule(partial(softmax_topk, renorm="norm_topk_prob", cast="logits"), dense_softmax,
                    lambda s: _flag(s, "norm_topk_prob"))
SOFTMAX_TOPK_RENORM = Rule(partial(softmax_topk, renorm=True, cast="logits"), dense_softmax, _always(True))
SOFTMAX_TOPK_RENORM_FP32 = Rule(partial(softmax_topk, renorm=True, cast=None, upcast_first=True), dense_softmax,
                                _always(True))
SOFTMAX_TOPK_INPUT_DTYPE = Rule(partial(softmax_topk, renorm=False, cast="input"), dense_softmax, _always(False))
TOPK_SOFTMAX = Rule(partial(topk_softmax, fp32=False, cast=None), dense_softmax, _always(True))
TOPK_SOFTMAX_FP32 = Rule(partial(topk_softmax, fp32=True, cast="input"), dense_softmax, _always(True))
COHERE2 = Rule(cohere2_topk, dense_cohere2, _always(True))
SIGMOID_GROUP_TOPK = Rule(sigmoid_group_topk,
                          partial(dense_sigmoid, norm="norm_topk_prob", scale="routed_scaling_factor", eps=1e-20),
                          _always(True))
SOFTMAX_GROUP_TOPK = Rule(softmax_group_topk, partial(dense_softmax, scale="routed_scaling_factor"), _always(False))
SOFTMAX_BIAS_TOPK = Rule(softmax_bias_topk, dense_softmax, _always(True))
SOFTMAX_BIAS_TOPK_SCALED = Rule(softmax_bias_topk_scaled, partial(dense_softmax, scale="routed_scaling_factor"),
                                _always(False))
SIGMOID_BIAS_TOPK = Rule(sigmoid_bias_topk, partial(dense_sigmoid, norm=True), _always(True))
SIGMOID_BIAS_TOPK_SCALED = Rule(sigmoid_bias_topk_scaled,
                                partial(dense_sigmoid, norm="norm_topk_prob", scale="routed_scaling_factor", eps=1e-6),
                                _always(True))
SPARSEMIXER = Rule(sparsemixer, dense_softmax, _always(False))
TOPK_SIGMOID = Rule(topk_sigmoid, partial(dense_sigmoid, norm=False), _always(True))
BLOCK_SOFTMAX_TOPK_PNORM = Rule(block_softmax_topk_pnorm, dense_softmax_pnorm,
                                lambda s: s.block.moe_normalize_expert_weights is not None)


# -- what a router returns, and how its experts run densely --------------------------------------------------------
def logits_weights_experts(z: torch.Tensor, select: Callable[[], Selection]):
    return (z, *select())


def scores_and_logits(z: torch.Tensor, select: Callable[[], Selection]):
    """Llama 4: every expert's score, sigmoid(-inf) = 0 for the unselected, then the logits."""
    weights, experts = select()
    return torch.zeros_like(z).scatter_(1, experts, weights), z


def logits_only(z: torch.Tensor, select: Callable[[], Selection]):
    return z


def fused_experts_dense(experts: nn.Module, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """transformers' fused experts, `experts(h, top_k_index, top_k_weights)`, with all E experts selected."""
    all_experts = torch.arange(p.shape[-1], device=p.device).expand(p.shape[0], -1)
    return experts.forward(h, all_experts, p.to(h.dtype))


def llama4_experts_dense(experts: nn.Module, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Llama 4's experts take every expert's copy of the tokens, scaled by its score, stacked expert-major."""
    return experts.forward(h.repeat(p.shape[-1], 1) * p.to(h.dtype).transpose(0, 1).reshape(-1, 1))


def no_args(block: nn.Module) -> tuple:
    return ()


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
    router_class: str  # class name of the router module in transformers
    rule: Rule
    logits: Logits = linear
    weight: str = "weight"  # the router's linear map, relative to the router module
    bias: str | None = None  # its bias, if the logits use one
    returns: Callable = logits_weights_experts  # (z, select) -> what the stock router returns
    args: Callable[[nn.Module], tuple] = no_args  # MoE block -> the extra arguments it passes its router
    top_k_on_block: bool = False  # top_k lives on the MoE block (gating there), not on the router
    dense_experts: Callable = fused_experts_dense  # (experts, h, p) -> experts' output with every expert at p
    load_balance: Callable[[list[torch.Tensor], int], torch.Tensor] = switch_load_balance  # the aux loss


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("olmoe", "OlmoeTopKRouter", SOFTMAX_TOPK),
    Family("flex_olmo", "FlexOlmoTopKRouter", SOFTMAX_TOPK),
    Family("qwen2_moe", "Qwen2MoeTopKRouter", SOFTMAX_TOPK),
    Family("qwen3_moe", "Qwen3MoeTopKRouter", SOFTMAX_TOPK),
    Family("qwen3_next", "Qwen3NextTopKRouter", SOFTMAX_TOPK),
    Family("qwen3_5_moe", "Qwen3_5MoeTopKRouter", SOFTMAX_TOPK_RENORM),
    Family("hunyuan_v1_moe", "HunYuanMoEV1Gate", SOFTMAX_TOPK_RENORM, logits=linear_fp32_if_fp32_weight,
           weight="wg.weight"),
    Family("mixtral", "MixtralTopKRouter", SOFTMAX_TOPK_RENORM_FP32),
    Family("minimax", "MiniMaxTopKRouter", SOFTMAX_TOPK_RENORM_FP32),
    Family("jamba", "JambaTopKRouter", SOFTMAX_TOPK_INPUT_DTYPE),
    Family("gpt_oss", "GptOssTopKRouter", TOPK_SOFTMAX, bias="bias"),
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


@dataclass(frozen=True)
class RouterSite:
    """One MoE layer's router, as found in a loaded model, and everything other modules may ask of it."""

    layer: int  # decoder layer index (dense layers of mixed models are skipped, so ids may have gaps)
    name: str  # module path, e.g. "model.layers.3.mlp.gate"
    module: nn.Module  # the router; in a vLLM model a VllmRouter view of its gate
    block: nn.Module  # the MoE block that calls it (its parent)
    decoder_layer: nn.Module
    decoder_layer_name: str
    family: Family

    @property
    def weight(self) -> torch.Tensor:
        """The router's linear map (E, d), as its forward sees it (peft's LoRA on it is a parametrization, not a
        parameter)."""
        return functools.reduce(getattr, self.family.weight.split("."), self.module)

    @property
    def bias(self) -> torch.Tensor | None:
        return functools.reduce(getattr, self.family.bias.split("."), self.module) if self.family.bias else None

    @property
    def weight_name(self) -> str:
        return f"{self.name}.{self.family.weight}"

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @property
    def top_k(self) -> int:
        return int((self.block if self.family.top_k_on_block else self.module).top_k)

    @property
    def experts(self) -> nn.Module:
        return self.block.experts

    @property
    def experts_name(self) -> str:
        return f"{self.name.rsplit('.', 1)[0]}.experts"

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Router logits (n, E) from the flattened router input (n, d), computed as the stock router does."""
        return self.family.logits(h, self.weight, self.bias)

    def gate(self, logits: torch.Tensor, dtype: torch.dtype | None = None, args: tuple | None = None) -> Selection:
        """The family's gating of `logits` (n, E): (weights (n, k), experts (n, k)) as the MoE block uses them.
        `dtype` is the router input's (default: the router weight's); `args` the block's extra router arguments."""
        args = self.family.args(self.block) if args is None else args
        return self.family.rule.select(self, logits, dtype or self.weight.dtype, args)

    def dense_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, E) fp32: every expert's weight under the family's rule with all experts selected (grad=dense)."""
        return self.family.rule.dense(self, logits)

    @property
    def sparse_grad(self) -> bool:
        """Whether the paper's gradient is zero on every unselected expert's logit (up to rounding)."""
        return self.family.rule.sparse_grad(self)

    def dense_experts(self, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The experts module's output for tokens h (n, d) with every expert selected at weights p (n, E)."""
        return self.family.dense_experts(self.experts, h, p)

    def route(self, hidden_states: torch.Tensor, args: tuple, transform) -> object:
        """The router's forward with `transform(site, h, z) -> z' | (z', selection)` between logits and gating:
        returns what the stock router returns, computed from z'."""
        h = hidden_states.reshape(-1, self.hidden_size)  # (n, d)
        out = transform(self, h, self.logits(h))
        z, selection = out if isinstance(out, tuple) else (out, None)  # z: (n, E)
        return self.family.returns(z, lambda: selection if selection is not None else self.gate(z, h.dtype, args))

    def check(self, n_tokens: int = 64) -> None:
        """Refuse this router unless its stock forward and our restatement agree bit for bit on a probe batch."""
        weight = self.weight
        dtype = next(self.experts.parameters(), weight).dtype  # the model's compute dtype (routers may be fp32)
        probe = torch.randn(n_tokens, self.hidden_size, generator=torch.Generator().manual_seed(0))
        probe = (probe * 4).to(device=weight.device, dtype=dtype)
        args = self.family.args(self.block)
        with torch.no_grad():
            stock = type(self.module).forward(self.module, probe.clone(), *args)
            ours = self.route(probe.clone(), args, lambda site, h, z: z)
        stock, ours = _as_tuple(stock), _as_tuple(ours)
        diff = None
        if len(stock) != len(ours):
            diff = f"it returns {len(stock)} tensors, we build {len(ours)}"
        for i, (a, b) in enumerate(zip(stock, ours)):
            if diff is None and (a.shape != b.shape or a.dtype != b.dtype):
                diff = f"output {i} is {a.dtype} {tuple(a.shape)} stock but {b.dtype} {tuple(b.shape)} hooked"
            elif diff is None and not torch.equal(a, b):
                diff = f"largest difference {(a.double() - b.double()).abs().max().item():.3g} in output {i}"
        if diff is not None:
            import transformers

            raise KnnMoeError(
                f"the {self.family.name} router {self.name} ({type(self.module).__name__}) of transformers "
                f"{transformers.__version__} no longer matches kNN-MoE's restatement of it ({diff}); kNN-MoE's "
                f"family adapters are tested with transformers {TESTED_TRANSFORMERS}. Install that release, or "
                "update this family's adapter in knnmoe_eval/families.py."
            )


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


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


def _decoder_layer(name: str) -> tuple[str, int]:
    """The decoder layer holding module `name` ("model.layers.3.mlp.gate" -> ("model.layers.3", 3)): the path up to
    its first numeric component, the index into the model's stack of layers."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1]), int(part)
    raise KnnMoeError(f"cannot tell which decoder layer the router {name!r} belongs to (no layer index in its path)")


def find_routers(model: nn.Module, check: bool = True) -> list[RouterSite]:
    """Every MoE router of `model`, ordered by layer, each checked against its stock forward (`check`); raises if
    the family is unsupported, none is found, or a router no longer matches our restatement of it."""
    family = family_of(model)
    sites = []
    for name, module in model.named_modules():
        if type(module).__name__ == family.router_class:
            if ".original_module" in name:
                continue  # peft's modules_to_save keeps the frozen original beside the trained copy, which runs
            layer_name, layer = _decoder_layer(name)
            # peft wraps a router as <router>.base_layer (LoRA on its weight) or <router>.modules_to_save.<adapter>
            router_path = re.sub(r"\.(base_layer|modules_to_save\.[^.]+)$", "", name)
            block_name = router_path.rsplit(".", 1)[0]
            sites.append(RouterSite(layer, name, module, model.get_submodule(block_name),
                                    model.get_submodule(layer_name), layer_name, family))
    if not sites:
        raise KnnMoeError(
            f"no {family.router_class} modules found in this {family.name} model: its MoE layers may have been "
            "replaced (e.g. by a hub kernel). Load the model without kernels (use_kernels=False)."
        )
    if check:
        for site in sites:
            site.check()
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
        RouterSite(_decoder_layer(name)[1], name, VllmRouter(*_vllm_gate_weights(module, cfg.hidden_size), top_k, norm),
                   None, None, _decoder_layer(name)[0], family)  # vLLM's MoE block and layer are not transformers'
        for name, module in model.named_modules()
        if name.endswith(suffix) and hasattr(module, "weight")
    ]
    if not sites:
        raise KnnMoeError(f"no '*{suffix}' router modules found in this vLLM {family.name} model")
    return sorted(sites, key=lambda s: s.layer)
