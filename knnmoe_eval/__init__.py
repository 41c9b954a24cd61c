"""kNN-MoE: retrieval-augmented expert routing for frozen Mixture-of-Experts models.

The public API is imported lazily so that `import knnmoe_eval` (done at every interpreter start by our `.pth`
hook) costs nothing; torch, faiss and lm-eval load only when one of these names is used.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "attach": "knnmoe_eval.retrieval",
    "Retriever": "knnmoe_eval.retrieval",
    "KnnMoeOptions": "knnmoe_eval.options",
    "Memory": "knnmoe_eval.memory",
    "load_memory": "knnmoe_eval.memory",
    "write_memory": "knnmoe_eval.memory",
    "KnnMoeError": "knnmoe_eval.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'knnmoe_eval' has no attribute {name!r}")
