"""The worker half of `vllm-knnmoe`: kNN-MoE routing inside each vLLM worker process.

vLLM runs the model in worker processes, so the routing cannot be attached from the process that evaluates.
This class is handed to vLLM as `worker_extension_cls` (vLLM mixes it into its Worker class) and its methods are
called by name through `LLM.collective_rpc`: only plain data crosses the process boundary, no code is pickled.

Each MoE block's router is a `GateLinear` whose logits go straight to FusedMoE; its forward is replaced on the
instance by: stock logits z, then `Retriever` (the same one `hf-knnmoe` uses: same indexes, same `mixing`) on
the flattened token batch, once per layer per forward, then z' to the experts. vLLM runs eager here
(`enforce_eager` is forced), so the batch holds exactly the scheduled tokens: no padding rows to skip.
Errors are returned as text rather than raised, so the evaluating process re-raises them as `KnnMoeError`.
"""

from __future__ import annotations

import torch

from ..core.families import RouterSite, find_vllm_routers
from ..core.memory import load_memory
from ..core.options import KnnMoeOptions
from ..core.retrieval import Retriever
from ..errors import KnnMoeError


def _hooked_forward(gate: torch.nn.Module, site: RouterSite, retriever: Retriever, calls: dict[int, int]):
    stock = gate.forward

    def forward(hidden_states: torch.Tensor):
        out = stock(hidden_states)
        z, bias = out if isinstance(out, tuple) else (out, None)  # z: (n_tokens, E)
        mixed = retriever(site, hidden_states.reshape(-1, site.hidden_size), z)
        z = mixed[0] if isinstance(mixed, tuple) else mixed  # FusedMoE gates z' itself
        calls[site.layer] += 1
        return (z, bias) if isinstance(out, tuple) else z

    return forward


class KnnMoeWorkerExtension:
    """Methods vLLM adds to its Worker; `self` is the worker, whose model runner holds the model."""

    def knnmoe_attach(self, options: dict) -> str | None:
        """Load the memory, check it against this worker's model, hook every router; an error message or None."""
        try:
            model = self.model_runner.get_model()
            opts = KnnMoeOptions(**options)
            sites = find_vllm_routers(model)
            retriever = Retriever(model, load_memory(opts.memory, opts.verify), opts, sites=sites)
            if getattr(self, "_knnmoe", None) is not None:
                raise KnnMoeError("this vLLM engine already routes with a memory: use one engine per memory")
        except KnnMoeError as e:
            return str(e)
        calls = {site.layer: 0 for site in sites}
        for site in sites:
            gate = model.get_submodule(site.name)
            gate.forward = _hooked_forward(gate, site, retriever, calls)
        self._knnmoe = (retriever, calls)
        return None

    def knnmoe_check_fired(self) -> str | None:
        """After a forward: an error naming routers that vLLM bypassed (e.g. a fused gate kernel), or None."""
        retriever, calls = self._knnmoe
        silent = [site.name for site in retriever.sites if calls[site.layer] == 0]
        if silent:
            return (f"the kNN-MoE router hook never ran for {silent}: this vLLM build computes those routers' "
                    "logits without calling the gate module, so vllm-knnmoe cannot route this model")
        return None

    def knnmoe_diagnostics(self, reset: bool = False) -> dict:
        retriever, _ = self._knnmoe
        out = retriever.diagnostics()
        if reset:
            retriever.reset_diagnostics()
        return out
