"""Load balance under any routing (the paper's Table 11): the family's own auxiliary loss on each test prompt.

The paper compares the average load-balancing loss over the test set of zero-shot, SFT, router-only SFT and
kNN-MoE, to show that SFT did not collapse the routing. Here every test prompt runs alone (no padding enters the
statistic) under the method's routing, the routers' logits are read where the hooks see them (after kNN-MoE's
mixing when there is a retriever), and transformers' `load_balancing_loss_func` (every family here uses it) is taken
per prompt over all MoE layers, as the model computes it for a batch of one.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.hooks import Recorder, Transform, hooked_routers
from ..core.routers import RouterSite


def switch_load_balance(logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """transformers' `load_balancing_loss_func` (Switch Transformer eq. 4-6), one sequence: E * sum_e f_e P_e over
    the rows of every layer together, where f_e is the share of top-k slots (of the softmax) that went to expert e
    and P_e the mean softmax probability of e. 1 per slot when balanced (= top_k).

    logits: one (n_tokens, E) tensor per MoE layer, as its router returned them (after any hook)."""
    z = torch.cat([l.float() for l in logits])  # (layers * n_tokens, E)
    probs = F.softmax(z, dim=-1)
    selected = torch.topk(probs, top_k, dim=-1).indices  # (rows, k)
    f = torch.bincount(selected.reshape(-1), minlength=z.shape[-1]).float() / z.shape[0]  # (E,) summed over slots
    return z.shape[-1] * (f * probs.mean(0)).sum()


@torch.no_grad()
def load_balance(model: torch.nn.Module, sites: Sequence[RouterSite], sequences: list[list[int]],
                 inner: Transform | None = None) -> list[float]:
    """The family's load-balancing loss of each token sequence, run alone under `inner`'s routing (stock if None).
    Every router must run (`find_routers` leaves out the frozen original that peft's modules_to_save keeps beside
    a router-only SFT's trained copy)."""
    recorder = Recorder(inner)
    device = next(model.parameters()).device
    top_k = sites[0].top_k
    losses = []
    with hooked_routers(sites, recorder):
        for tokens in tqdm(sequences, desc="load balance", unit="seq"):
            recorder.logits = {}
            model(torch.tensor([tokens], device=device))
            losses.append(float(switch_load_balance([recorder.logits[l] for l in sorted(recorder.logits)], top_k)))
    return losses
