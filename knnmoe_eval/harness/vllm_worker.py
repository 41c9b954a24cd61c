"""The worker half of `vllm-knnmoe`: attaching a memory inside each vLLM worker process, and its diagnostics.

vLLM runs the model in worker processes, so the memory cannot be attached from the process that evaluates.
This class is handed to vLLM as `worker_extension_cls` (vLLM mixes it into its Worker class) and its methods are
called by name through `LLM.collective_rpc`: only plain data crosses the process boundary, no code is pickled.

The routers themselves were built by the plugin (`vllm_plugin.py`) as `KnnMoeGate`s that call `knnmoe::route`;
attach checks that, builds the same `Retriever` as `hf-knnmoe` (same indexes, same `mixing`) and puts it in the
process's routing registry, which the op reads. Errors are returned as text rather than raised, so the
evaluating process re-raises them as `KnnMoeError`.
"""

from __future__ import annotations

from ..core.memory import load_memory
from ..core.options import KnnMoeOptions
from ..core.retrieval import Retriever
from ..core.routers import find_vllm_routers
from ..errors import KnnMoeError
from .vllm_plugin import ENGINE_KEY, ROUTING, KnnMoeGate


class KnnMoeWorkerExtension:
    """Methods vLLM adds to its Worker; `self` is the worker, whose model runner holds the model."""

    def knnmoe_attach(self, options: dict) -> str | None:
        """Load the memory, check it against this worker's model, route with it; an error message or None."""
        try:
            model = self.model_runner.get_model()
            opts = KnnMoeOptions(**options)
            sites = find_vllm_routers(model)
            gates = {site.name: model.get_submodule(site.name) for site in sites}
            stock = [name for name, g in gates.items() if getattr(g, "knnmoe_layer", None) is None]
            if stock:
                why = ("the knnmoe vLLM plugin was not loaded in this worker (is `knnmoe` missing from "
                       "VLLM_PLUGINS?)" if not all(isinstance(g, KnnMoeGate) for g in gates.values()) else
                       f"the engine was started without additional_config={{'{ENGINE_KEY}': ...}}")
                raise KnnMoeError(f"the routers {stock} are vLLM's stock gates: {why}; start the engine "
                                  "through `--model vllm-knnmoe`")
            retriever = Retriever(model, load_memory(opts.memory, opts.verify), opts, sites=sites)
            if ROUTING.retriever is not None:  # after the checks: a wrong memory is named as hf-knnmoe names it
                raise KnnMoeError("this vLLM engine already routes with a memory: use one engine per memory")
        except KnnMoeError as e:
            return str(e)
        ROUTING.install(retriever, {gates[site.name].knnmoe_layer: site for site in sites})
        return None

    def knnmoe_check_fired(self) -> str | None:
        """After a forward: an error naming routers whose op never ran (a gate bypassed by a fused kernel), or None."""
        silent = [site.name for key, site in ROUTING.sites.items() if ROUTING.calls[key] == 0]
        if silent:
            return (f"knnmoe::route never ran for {silent}: this vLLM build computes those routers' logits "
                    "without calling the gate module, so vllm-knnmoe cannot route this model")
        return None

    def knnmoe_calls(self) -> dict[str, int]:
        """How many forwards ran the op, per MoE layer (`RouterSite.layer`)."""
        return {str(site.layer): ROUTING.calls[key] for key, site in ROUTING.sites.items()}

    def knnmoe_diagnostics(self, reset: bool = False) -> dict:
        out = ROUTING.retriever.diagnostics()
        if reset:
            ROUTING.retriever.reset_diagnostics()
            ROUTING.calls = dict.fromkeys(ROUTING.calls, 0)
        return out
