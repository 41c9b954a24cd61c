"""The vLLM general plugin of `vllm-knnmoe`: every MoE router routes through the op `knnmoe::route`.

vLLM loads the entry points of the group `vllm.general_plugins` in every process it starts, workers included,
before any model is built. `register` swaps in `KnnMoeGate` for vLLM's `GateLinear` (the router class of every
vLLM MoE model, `PluggableLayer.register_oot`), so the routers are ours from construction on: the model vLLM
compiles and captures already calls the op. A forward replaced on the instance after compilation would be
ignored (vLLM compiles with fullgraph and drops guards), which is why `vllm-knnmoe` used to force eager mode.

`KnnMoeGate` is stock unless the engine's `additional_config` holds `{"knnmoe": {...}}` (`ENGINE_KEY`, which
`vllm-knnmoe` sets): an engine started by plain `vllm` traces exactly `GateLinear.forward`. When on, its forward
is the stock logits z, then `knnmoe::route(h, z, out, layer)` writes the logits the experts gate into `out`.

The op is opaque to torch.compile (a fake impl gives shapes) and is one of the engine's `splitting_ops`
(`compilation_config`), so piecewise CUDA graphs capture everything between the ops and the search runs eager,
outside any graph: faiss is a host call, the exact GPU index syncs. Its body reads the per-layer `Retriever`
from this process's registry, filled by the worker extension's attach (`vllm_worker.py`); before attach (vLLM's
profiling and warm-up runs) it copies z. Under CUDA graphs the batch is padded to a captured size: only the
real rows (vLLM's `ForwardContext.is_padding`) are searched, padding rows keep z.
"""

import re

import torch
from torch.library import Library
from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear

from ..core.hooks import route_logits

ENGINE_KEY = "knnmoe"  # additional_config key that switches the routers on; it enters vLLM's compile-cache hash
OP = "knnmoe::route"
# vLLM's own MoE op, where the router runs inside it: in vLLM 0.32, qwen3_moe (and deepseek_v2, qwen3_next)
# hand the gate to FusedMoE, whose runner calls it inside `vllm::moe_forward` on a GPU (inlined on CPU).
# That op must then be split out too, or the search would be captured inside a piecewise graph.
FUSED_MOE_OPS = ("vllm::moe_forward", "vllm::moe_forward_shared")
GATE_INSIDE_FUSED_MOE = frozenset({"qwen3_moe", "deepseek_v2", "deepseek_v3", "qwen3_next"})


class _Routing:
    """This process's routing state: the retriever and, per op key (the gate's layer), its RouterSite."""

    def __init__(self):
        self.retriever = None
        self.sites: dict = {}
        self.calls: dict[int, int] = {}

    def install(self, retriever, sites: dict) -> None:
        self.retriever, self.sites = retriever, dict(sites)
        self.calls = dict.fromkeys(self.sites, 0)


ROUTING = _Routing()


def _real_rows(n: int) -> int:
    """How many leading rows of a batch of n are scheduled tokens; the rest is CUDA-graph padding."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return n
    pad = get_forward_context().is_padding  # (n,) bool; GPUModelRunner._prepare_padding_mask puts padding last
    if pad is None or pad.numel() != n:  # e.g. a sequence-parallel chunk: no mask for it, all rows searched
        return n
    return n - int(pad.sum())


def _route(h: torch.Tensor, z: torch.Tensor, out: torch.Tensor, layer: int) -> None:
    site = ROUTING.sites.get(layer)
    if site is None:  # not attached (vLLM's profiling and warm-up runs): stock routing
        out.copy_(z)
        return
    ROUTING.calls[layer] += 1
    n = _real_rows(z.shape[0])
    # the package's one router door: z's own rows wherever lambda = 0; FusedMoE gates these logits itself
    out[:n] = route_logits(site, h[:n].reshape(n, -1), z[:n], ROUTING.retriever)
    out[n:] = z[n:]


def _route_fake(h: torch.Tensor, z: torch.Tensor, out: torch.Tensor, layer: int) -> None:
    return None


_LIB = Library("knnmoe", "FRAGMENT")  # the op lives as long as this module


def _register_op() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    # direct registration (no torch.library.custom_op dispatch layers): the op runs once per MoE layer per step
    direct_register_custom_op("route", _route, mutates_args=["out"], fake_impl=_route_fake, target_lib=_LIB)


_register_op()


def _layer_of(prefix: str) -> int:
    numbers = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", prefix)
    if not numbers:
        raise ValueError(f"vllm-knnmoe: cannot tell the layer of the router '{prefix}'")
    return int(numbers[-1])


class KnnMoeGate(GateLinear):
    """`GateLinear` whose logits go through `knnmoe::route` when the engine routes with a memory."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        extra = getattr(config, "additional_config", None)
        on = isinstance(extra, dict) and bool(extra.get(ENGINE_KEY))
        self.knnmoe_layer = _layer_of(self.prefix) if on else None  # the op's key for this router

    def forward(self, x: torch.Tensor):
        out = super().forward(x)
        if self.knnmoe_layer is None:  # a Python constant when traced: plain engines compile the stock graph
            return out
        z, bias = out if isinstance(out, tuple) else (out, None)
        routed = torch.empty_like(z)
        torch.ops.knnmoe.route(x, z, routed, self.knnmoe_layer)
        return (routed, bias) if isinstance(out, tuple) else routed


def register() -> None:
    """Entry point of `vllm.general_plugins`; vLLM calls it once per process."""
    from vllm.model_executor.custom_op import op_registry_oot

    if op_registry_oot.get("GateLinear") is not KnnMoeGate:
        GateLinear.register_oot(KnnMoeGate)
