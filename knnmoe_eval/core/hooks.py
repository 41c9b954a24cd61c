"""The one hook mechanism shared by retrieval and memory building.

Each router *instance* gets its forward replaced (checkpoint key names, `output_router_logits` recording and the
MoE block's call all stay as they are) by `RouterSite.route`: logits from the router input,
`transform(site, h, z) -> z'`, then the family's own gating on z' (or `-> (z', gating)` when the transform has
already run that gating), returned in the shape the stock router returns. Retrieval's
transform mixes in the memory; the build's adds trainable offsets and records keys. The context manager restores
every router in `finally` and, on exit, checks that every hooked router actually ran: a hub kernel that replaces
the MoE forward would otherwise silently bypass us.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from ..errors import KnnMoeError
from .families import RouterSite

Transform = Callable[[RouterSite, torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, tuple]]


def _hooked_forward(site: RouterSite, transform: Transform, calls: dict[int, int]):
    def forward(hidden_states: torch.Tensor, *args):  # args: what some MoE blocks pass (a correction bias)
        calls[site.layer] += 1
        return site.route(hidden_states, args, transform)

    return forward


@contextmanager
def hooked_routers(sites: Sequence[RouterSite], transform: Transform, check_fired: bool = True) -> Iterator[None]:
    calls = {site.layer: 0 for site in sites}
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
    if check_fired and any(n == 0 for n in calls.values()):
        silent = [site.name for site in sites if calls[site.layer] == 0]
        raise KnnMoeError(
            f"the kNN-MoE router hook never ran for {silent}: the MoE forward bypassed the router module "
            "(a hub kernel such as MegaBlocksMoeMLP?). Load the model with use_kernels=False."
        )
