"""The one door to every router: the only module that touches a router's forward, for every backend and caller
(`hf-knnmoe`'s retrieval, the memory builder, `vllm-knnmoe`, the experiments and the scripts).

Inside `hooked_routers(sites, transform)` each router *instance* gets its forward replaced (checkpoint key names,
`output_router_logits` recording and the MoE block's call stay as they are). The replacement computes the logits z
(n, E) from the flattened router input h (n, d) and asks `transform(site, h, z)`, which answers with
- `z` itself: nothing changes; the router returns the stock router's own output;
- a `Rerouted`: the rows it names are routed by its logits, every other row gets the stock router's own output,
  row by row in every tensor the router returns (retrieval: the rows with lambda > 0). So an empty or far memory
  reproduces the model bit for bit by construction, on every CPU kernel, GPU kernel, dtype and transformers
  release: our restatement of the family's gating (`gating.py`) only routes the rows kNN-MoE moves;
- any other tensor z': every row is routed by z' through the restated gating (the build's leaf logits, whose
  gradient must run through that gating).

vLLM's routers return logits only, which its FusedMoE gates itself: there the door is `route_logits`, called from
the `knnmoe::route` op that vLLM's gates run (`harness/vllm_plugin.py`), and hands back z with the moved rows
replaced, the other rows being z's own values.

The context manager restores every router in `finally` and, on exit, checks that every hooked router actually ran:
a hub kernel that replaces the MoE forward would otherwise silently bypass us.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..errors import KnnMoeError
from .gating import Selection
from .routers import RouterSite, _as_tuple


@dataclass(frozen=True)
class Rerouted:
    """A transform's answer when it moves the routing of some rows only."""

    logits: torch.Tensor  # (n, E) z': the moved rows' new logits, z's own everywhere else
    rows: torch.Tensor  # (m,) int64: the moved rows
    selection: Selection | None = None  # the gating of logits[rows], when the transform already computed it


Transform = Callable[[RouterSite, torch.Tensor, torch.Tensor], "torch.Tensor | Rerouted"]


def routed_logits(out: torch.Tensor | Rerouted) -> torch.Tensor:
    """The (n, E) logits a transform's answer routes by."""
    return out.logits if isinstance(out, Rerouted) else out


class Recorder:
    """Hook transform that keeps, per layer, the router input h (n, d) and the logits (n, E) it routes by, after
    `inner`'s answer if there is one (stock routing otherwise). Detached: what builds, tests and scripts read."""

    def __init__(self, inner: Transform | None = None):
        self.inner = inner
        self.inputs: dict[int, torch.Tensor] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def __call__(self, site: RouterSite, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor | Rerouted:
        out = z if self.inner is None else self.inner(site, h, z)
        self.inputs[site.layer], self.logits[site.layer] = h.detach(), routed_logits(out).detach()
        return out


def route(site: RouterSite, hidden_states: torch.Tensor, args: tuple, transform: Transform):
    """A transformers router's forward with `transform` between its logits and its gating (module docstring)."""
    h = hidden_states.reshape(-1, site.hidden_size)  # (n, d)
    z = site.logits(h)
    out = transform(site, h, z)
    if out is z:
        return site.stock(hidden_states, args)
    if not isinstance(out, Rerouted):
        return site.output(out, h.dtype, args)
    stock = site.stock(hidden_states, args)
    if out.rows.numel() == 0:
        return stock
    moved = _as_tuple(site.output(out.logits[out.rows], h.dtype, args, out.selection))
    merged = []
    for a, b in zip(_as_tuple(stock), moved):  # same shapes and dtypes: `RouterSite.check` verified it at load
        a = a.clone()
        a[out.rows] = b
        merged.append(a)
    return tuple(merged) if isinstance(stock, (tuple, list)) else merged[0]


def route_logits(site: RouterSite, h: torch.Tensor, z: torch.Tensor, transform: Transform) -> torch.Tensor:
    """The logits (n, E) a logits-only router (vLLM's gate) hands on: z, with the rows `transform` moves replaced."""
    out = transform(site, h, z)
    return z if out is z else routed_logits(out)


def _hooked_forward(site: RouterSite, transform: Transform, calls: Counter):
    def forward(hidden_states: torch.Tensor, *args):  # args: what some MoE blocks pass (a correction bias)
        calls[site.layer] += 1
        return route(site, hidden_states, args, transform)

    return forward


@contextmanager
def hooked_routers(sites: Sequence[RouterSite], transform: Transform, check_fired: bool = True) -> Iterator[None]:
    """Route transformers `sites` through `transform` inside the with-block; on leaving it, a router that never ran
    (check_fired) is an error, since the MoE forward then went around the door."""
    calls = Counter({site.layer: 0 for site in sites})
    installed = []  # only these are ours to remove: a refused nested hook leaves the outer context's in place
    try:
        for site in sites:
            if "forward" in vars(site.module):
                raise KnnMoeError(f"router {site.name} is already hooked: kNN-MoE hooks cannot be nested")
            site.module.forward = _hooked_forward(site, transform, calls)
            installed.append(site)
        yield
    finally:
        for site in installed:
            del site.module.forward
    silent = [site.name for site in sites if calls[site.layer] == 0]
    if check_fired and silent:
        raise KnnMoeError(
            f"the kNN-MoE router hook never ran for {silent}: the MoE forward bypassed the router module (a hub "
            "kernel such as MegaBlocksMoeMLP?). Load the model with use_kernels=False."
        )
