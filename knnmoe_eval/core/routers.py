"""The routers of a loaded model: `RouterSite` (one MoE layer's router and what may be asked of it), their discovery
in a transformers or vLLM model, and the self-check that refuses a router our restatement no longer follows.

Every other module talks to a `RouterSite` and never names a family; the family knowledge comes from `families.py`.

The self-check. Tokens with lambda = 0 get the stock router's own output (`hooks.py`), so an empty or far memory
reproduces the model bit for bit whatever our restatement does. The restatement (`RouterSite.output`: the family's
logits and gating recomputed, `gating.py`) routes only the tokens kNN-MoE moves, and must be faithful there. At load,
`check` runs each router stock and restated on probe batches of `PROBE_TOKENS` tokens and compares every tensor it
returns: the same shapes and dtypes, the same expert set per token, and every float within `ULPS` units in the last
place of its dtype (relative), the rounding that a kernel working on another shape of the same numbers may differ by
(Llama 4's sigmoid of the k chosen logits vs of all E, on AVX-512, is one ulp). A transformers release whose router
does anything else is refused, naming the family, the version and the largest difference, before any forward.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import KnnMoeError
from .families import FAMILIES, TESTED_TRANSFORMERS, Family, family_of
from .gating import Selection

# one token (a decode step), sizes off every vector width, a prefill longer than a SIMD tail
PROBE_TOKENS = (1, 7, 64, 513)
ULPS = 4


@dataclass(frozen=True)
class VllmRouter:
    """The router a `RouterSite` describes, for a vLLM gate: its weights, and k and renormalisation from the config."""

    weight: torch.Tensor  # (E, d), shared with the vLLM module
    bias: torch.Tensor | None
    top_k: int
    norm_topk_prob: bool


@dataclass(frozen=True)
class RouterSite:
    """One MoE layer's router, as found in a loaded model, and everything other modules may ask of it."""

    layer: int  # decoder layer index (dense layers of mixed models are skipped, so ids may have gaps)
    name: str  # module path, e.g. "model.layers.3.mlp.gate"
    module: nn.Module | VllmRouter  # the router (transformers), or a view of a vLLM gate's weights and config
    block: nn.Module | None  # the MoE block that calls it; None in vLLM, whose FusedMoE gates the logits itself
    decoder_layer: nn.Module | None  # None in vLLM (its layers are not transformers' modules)
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

    def output(self, logits: torch.Tensor, dtype: torch.dtype, args: tuple, selection: Selection | None = None):
        """What the stock router returns, restated from `logits` (n, E) (and their gating, if already computed)."""
        return self.family.returns(logits, lambda: selection if selection is not None else
                                   self.gate(logits, dtype, args))

    def stock(self, hidden_states: torch.Tensor, args: tuple):
        """The stock router's own forward (its class's, whatever is installed on the instance)."""
        return type(self.module).forward(self.module, hidden_states, *args)

    def dense_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, E) fp32: every expert's weight under the family's rule with all experts selected (grad=dense)."""
        return self.family.rule.dense(self, logits)

    def dense_experts(self, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The experts module's output for tokens h (n, d) with every expert selected at weights p (n, E)."""
        return self.family.dense_experts(self.experts, h, p)

    def check(self) -> None:
        """Refuse this router unless our restatement of it is faithful on every probe batch (module docstring)."""
        weight = self.weight
        dtype = next(self.experts.parameters(), weight).dtype  # the model's compute dtype (routers may be fp32)
        args = self.family.args(self.block)
        gen = torch.Generator().manual_seed(0)
        for n in PROBE_TOKENS:
            probe = (torch.randn(n, self.hidden_size, generator=gen) * 4).to(device=weight.device, dtype=dtype)
            with torch.no_grad():
                stock = _as_tuple(self.stock(probe.clone(), args))
                ours = _as_tuple(self.output(self.logits(probe), probe.dtype, args))
            diff = unfaithful(stock, ours)
            if diff is not None:
                import transformers

                raise KnnMoeError(
                    f"the {self.family.name} router {self.name} ({type(self.module).__name__}) of transformers "
                    f"{transformers.__version__} no longer matches kNN-MoE's restatement of it on {n} probe tokens "
                    f"({diff}); kNN-MoE's family adapters are tested with transformers {TESTED_TRANSFORMERS}. "
                    "Install that release, or update this family's adapter in knnmoe_eval/core/families.py."
                )


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def unfaithful(stock: tuple, ours: tuple) -> str | None:
    """Why the restated router outputs `ours` do not follow `stock`, or None (see the module docstring).

    Expert ids are compared as sets per token: each row of the id tensor is sorted, and the float outputs of its
    shape (the weights paired with the ids) are permuted alike before they are compared."""
    if len(stock) != len(ours):
        return f"it returns {len(stock)} tensors, we build {len(ours)}"
    for i, (a, b) in enumerate(zip(stock, ours)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i} is {a.dtype} {tuple(a.shape)} stock but {b.dtype} {tuple(b.shape)} restated"
    stock, ours = list(stock), list(ours)
    for i, (a, b) in enumerate(zip(stock, ours)):
        if a.dtype.is_floating_point:
            continue
        a_order, b_order = a.sort(-1).indices, b.sort(-1).indices
        if not torch.equal(a.gather(-1, a_order), b.gather(-1, b_order)):
            moved = int((a.sort(-1).values != b.sort(-1).values).any(-1).sum())
            return f"output {i}: another expert set for {moved} tokens"
        for j in range(len(stock)):
            if stock[j].dtype.is_floating_point and stock[j].shape == a.shape:
                stock[j], ours[j] = stock[j].gather(-1, a_order), ours[j].gather(-1, b_order)
    for i, (a, b) in enumerate(zip(stock, ours)):
        if not a.dtype.is_floating_point:
            continue
        eps = torch.finfo(a.dtype).eps
        a64, b64 = a.double(), b.double()
        same = (a64 == b64) | ((a64 - b64).abs() <= ULPS * eps * a64.abs())
        if not bool(same.all()):
            worst = (a64 - b64).abs().masked_fill(same, 0).max().item()
            return f"largest difference {worst:.3g} in output {i}, beyond {ULPS} ulps of {a.dtype}"
    return None


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
    """Every MoE router of a vLLM model (`RouterSite.name` is the gate module's path), ordered by layer. vLLM keeps
    k and the renormalisation in the config, not on the module."""
    family = family_of(model)
    if family.vllm_router is None:
        vllm = sorted(name for name, f in FAMILIES.items() if f.vllm_router)
        raise KnnMoeError(
            f"vllm-knnmoe does not know where vLLM keeps the {family.name} router. Supported families: "
            f"{', '.join(vllm)}."
        )
    cfg = model.config
    top_k = int(cfg.num_experts_per_tok)
    suffix = "." + family.vllm_router
    norm = bool(getattr(cfg, "norm_topk_prob", False))
    sites = []
    for name, gate in model.named_modules():
        if name.endswith(suffix) and hasattr(gate, "weight"):
            layer_name, layer = _decoder_layer(name)
            view = VllmRouter(*_vllm_gate_weights(gate, cfg.hidden_size), top_k, norm)
            sites.append(RouterSite(layer, name, view, None, None, layer_name, family))
    if not sites:
        raise KnnMoeError(f"no '*{suffix}' router modules found in this vLLM {family.name} model")
    return sorted(sites, key=lambda s: s.layer)

