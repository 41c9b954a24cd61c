"""Make `lm_eval --model hf-knnmoe` and `vllm-knnmoe` work on lm-eval releases without model plugin entry points.

Imported from a `.pth` file at every interpreter start, so it must cost nothing: it imports neither torch nor
lm_eval. It puts a finder on `sys.meta_path` that waits for `lm_eval.api.registry` to be imported; right after
that module has run, it registers our models as lazy "module:Class" placeholders (a module is imported only
when its model is asked for, so `vllm-knnmoe` costs nothing where vLLM is not installed). `lm_eval.models` is
imported first because lm-eval fills its registry from it only while the registry is empty: registering into
an empty registry would hide every built-in model.
"""

import importlib.abc
import importlib.util
import sys

_WATCHED = "lm_eval.api.registry"
MODELS = {"hf-knnmoe": "knnmoe_eval.harness.lm:KnnMoeLM", "hf-c3po": "knnmoe_eval.experiments.c3po:C3POLM",
          "vllm-knnmoe": "knnmoe_eval.harness.vllm_lm:KnnMoeVLLM"}


def register() -> None:
    import lm_eval.models  # noqa: F401  (fills the registry with the built-in models first)
    from lm_eval.api.registry import model_registry

    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)


class _LoaderThenRegister(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register()


class _RegistryWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _WATCHED:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing into us
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThenRegister(spec.loader)
        return spec


def install() -> None:
    if _WATCHED in sys.modules:
        register()
    elif not any(isinstance(f, _RegistryWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())


install()
