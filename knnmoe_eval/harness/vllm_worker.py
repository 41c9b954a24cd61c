"""The worker half of `vllm-knnmoe`: kNN-MoE routing inside each vLLM worker process.

vLLM runs the model in worker processes, so the routing cannot be attached from the process that evaluates.
This class is handed to vLLM as `worker_extension_cls` (vLLM mixes it into its Worker class) and its methods are
called by name through `LLM.collective_rpc`: only plain data crosses the process boundary, no code is pickled.

Each MoE block's router is a `GateLinear` whose logits go straight to FusedMoE; it is hooked through the package's
one router door (`core/hooks.py`): stock logits z, then `Retriever` (the same one `hf-knnmoe` uses: same indexes,
same `mixing`) on the flattened token batch, once per layer per forward, then z' to the experts, z's own rows
wherever lambda = 0. vLLM runs eager here
(`enforce_eager` is forced), so the batch holds exactly the scheduled tokens: no padding rows to skip.
Errors are returned as text rather than raised, so the evaluating process re-raises them as `KnnMoeError`.
"""

from __future__ import annotations

from contextlib import ExitStack

from ..core.hooks import hooked_routers, silent_routers
from ..core.memory import load_memory
from ..core.options import KnnMoeOptions
from ..core.retrieval import Retriever
from ..core.routers import find_vllm_routers
from ..errors import KnnMoeError


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
        hooks = ExitStack()  # held for the engine's life: one engine per memory
        calls = hooks.enter_context(hooked_routers(sites, retriever, check_fired=False))
        self._knnmoe = (retriever, calls, hooks)
        return None

    def knnmoe_detach(self) -> None:
        """Restore every gate's own forward."""
        self._knnmoe[2].close()
        self._knnmoe = None

    def knnmoe_check_fired(self) -> str | None:
        """After a forward: an error naming routers that vLLM bypassed (e.g. a fused gate kernel), or None."""
        retriever, calls, _ = self._knnmoe
        silent = silent_routers(retriever.sites, calls)
        if silent:
            return (f"the kNN-MoE router hook never ran for {silent}: this vLLM build computes those routers' "
                    "logits without calling the gate module, so vllm-knnmoe cannot route this model")
        return None

    def knnmoe_diagnostics(self, reset: bool = False) -> dict:
        retriever = self._knnmoe[0]
        out = retriever.diagnostics()
        if reset:
            retriever.reset_diagnostics()
        return out
