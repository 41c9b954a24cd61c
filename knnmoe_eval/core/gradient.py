"""The build's gradient step: locally optimal router logits z* (paper §4.1, Eq. 2).

For a batch of teacher-forced reference sequences, every MoE layer's router output W_l h_l is replaced by a free
logit vector, a leaf initialised at the stock logits, and all layers' leaves are optimised jointly:

    z_l    = W_l h_l                         leaves, from the first (stock) forward; keys_l = h_l
    loss   = sum_t -log p(y_t | x_<=t; z)    over the scored positions t  (loss=sum; loss=mean: per-sequence mean)
    g_l    = d loss / d z_l                  all layers in one backward pass
    z_l   <- z_l - eta g_l                   T times (the paper: T = 1); optimizer=adam: Adam steps on the leaves
    z*_l   = z_l                             the last iterate, stored under the key h_l

The leaves replace the router outputs outright: no gradient runs through any router's W h, and in later steps a
later layer's logits are its own iterate, not W h recomputed under the earlier layers' new routing. (An offset on
the live logits, W h + delta with h moving with the earlier layers, is a different gradient that also runs through
every later router; on the README's toy it gave the same accuracy within 0.25 points, so it is not offered.)

Sequences never mix: a sequence's loss reaches only its own positions, and with `loss=sum` each position's own
target y_t drives its gradient (plus the targets after it, through attention; with one-token answers, as in every
multiple-choice benchmark, this is exactly Eq. 2). `loss=mean` divides each sequence's sum by its scored
positions, which shrinks the step of an n-token answer n-fold.

`grad=dense` (beyond the paper): the paper's gradient never names an unselected expert (zero for renormalising
families, one shared sign otherwise). The forward stays exactly sparse while the backward treats the layer as
the dense mixture of all experts under the family's own gating rule with every expert selected (straight-through,
as DenseMixer; `docs/families.md`): E/k times the expert compute.

`free=kept` (beyond the paper): only the scored (stored) positions' leaves move, so a value cannot count on routing
changes elsewhere that retrieval will not make; the columns before every row's first scored position then never
change, and the steps run from their key/value cache. `keys=mixed` (beyond the paper): after the steps, one more
forward with the scored positions routed by their z* reads the keys, so a later layer's key is the router input
it will meet once the earlier layers are mixed at inference, not the stock one.

Log-probabilities are computed at the scored positions only (`logits_to_keep`): a full-vocabulary fp32 logit
tensor of a whole batch is gigabytes at a 150k vocabulary.
"""

from __future__ import annotations

import copy
import functools
import inspect
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .hooks import Recorder, hooked_routers
from .routers import RouterSite


class LeafLogits:
    """Hook transform of the build: each layer's logits become a free leaf, initialised at the stock logits."""

    def __init__(self, dense: bool = False, rows: torch.Tensor | None = None):
        self.dense = dense
        self.rows = rows  # (n_tokens,) bool: the only rows whose logits move (free=kept), None: all
        self.leaves: dict[int, torch.Tensor] = {}  # (n_tokens, E) fp32, requires grad
        self.stock: dict[int, torch.Tensor] = {}  # (n_tokens, E) fp32
        self.keys: dict[int, torch.Tensor] = {}  # (n_tokens, d) router inputs of the stock forward
        self.dense_probs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # router input, weights (n_tokens, E)

    def __call__(self, site: RouterSite, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if site.layer not in self.leaves:  # first forward: routing is stock
            self.keys[site.layer] = h.detach()
            self.stock[site.layer] = z.detach().float()
            self.leaves[site.layer] = self.stock[site.layer].clone().requires_grad_()
        used = self.leaves[site.layer].to(z.dtype)  # (n_tokens, E): the live logits z are not used
        if not self.dense:
            return used
        # straight-through: the gating sees detached logits (forward exactly sparse); the experts' hook adds a
        # zero-valued dense mixture whose gradient reaches the leaf through every expert's weight under the rule
        self.dense_probs[site.layer] = (h.detach(), site.dense_weights(used))
        return used.detach()

    def z_star(self, layer: int) -> torch.Tensor:
        """The stored value of `layer`: the last iterate of its logits, (n_tokens, E) fp32."""
        return self.leaves[layer].detach().clone()

    def dense_hook(self, site: RouterSite):
        def hook(experts: torch.nn.Module, args, output):
            h, p = self.dense_probs.pop(site.layer)  # (n_tokens, d), (n_tokens, E)
            if self.rows is not None:  # only these rows' logits take a gradient: the dense mixture of the rest is
                h, p = h[self.rows], p[self.rows]  # never needed (free=kept: E/k times fewer expert calls saved)
            dense = site.dense_experts(h, p)
            dense = dense - dense.detach()  # zero-valued, carries the dense gradient
            if self.rows is None:
                return output + dense.view_as(output)  # DBRX keeps the batch dimension
            flat = output.reshape(-1, output.shape[-1])  # (n_tokens, d)
            flat = flat.index_put((self.rows.nonzero().squeeze(-1),), dense.reshape(-1, flat.shape[-1]), accumulate=True)
            return flat.view_as(output)

        return hook


@contextmanager
def _dense_experts(sites: Sequence[RouterSite], transform: LeafLogits) -> Iterator[None]:
    """Under grad=dense, every MoE layer's experts also return the (zero-valued) dense mixture."""
    with ExitStack() as stack:
        if transform.dense:
            for site in sites:
                stack.callback(site.experts.register_forward_hook(transform.dense_hook(site)).remove)
        yield


def target_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                    needed: torch.Tensor, past=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(target) and greedy hits at the columns where any row needs them.

    inputs, targets, needed: (b, T); returns logp (b, P) fp32, greedy (b, P) bool, cols (P,): the kept columns.
    `past`: the key/value cache of a prefix that `inputs` continue (consumed: pass a copy).
    """
    cols = needed.any(0).nonzero().squeeze(-1)  # (P,)
    kw = {} if past is None else {cache_arg(model): past}
    if keeps_logits(model):
        logits = model(inputs, logits_to_keep=cols, **kw).logits  # (b, P, V)
    else:
        logits = model(inputs, **kw).logits[:, cols]
    logits = logits.float()
    tgt = targets[:, cols]  # (b, P)
    logp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (b, P)
    return logp, logits.argmax(-1) == tgt, cols


class _Replay:
    """Hook transform: the optimised logits at the stored positions, the live logits elsewhere; records h."""

    def __init__(self, leaves: LeafLogits, rows: torch.Tensor):
        self.leaves, self.rows, self.keys = leaves, rows, {}

    def __call__(self, site: RouterSite, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.keys[site.layer] = h.detach()
        return torch.where(self.rows.unsqueeze(-1), self.leaves.z_star(site.layer).to(z.dtype), z)


@torch.no_grad()
def _keys_under(model, sites, inputs, leaves: LeafLogits, rows: torch.Tensor, past=None) -> dict[int, torch.Tensor]:
    """Router inputs when the stored positions route by their values, as they will once retrieved: a later
    layer's key then reflects the earlier layers' new routing instead of the stock one."""
    replay = _Replay(leaves, rows)
    with hooked_routers(sites, replay):
        model(inputs, **({} if past is None else {cache_arg(model): copy.deepcopy(past)}))
    return replay.keys


def shared_prefix(scored: torch.Tensor) -> int:
    """Columns before every row's first scored position: under free=kept their routing never moves, so the steps
    can start from their key/value cache instead of recomputing them (each step then runs the answers alone)."""
    return int(scored.float().argmax(1)[scored.any(1)].min())


@torch.no_grad()
def _prefix_cache(model, sites, inputs: torch.Tensor) -> tuple[object, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """The stock forward of the shared prefix: its key/value cache, router inputs and logits per layer."""
    recorder = Recorder()
    with hooked_routers(sites, recorder):
        out = model(inputs, use_cache=True)
    return getattr(out, cache_arg(model)), recorder.inputs, {l: z.float() for l, z in recorder.logits.items()}


def cache_arg(model) -> str:
    """transformers 5 renamed the key/value cache argument and output `past_key_values` -> `cache`."""
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (most causal LMs): only the named positions' logits are
    computed, instead of a (b, T, V) tensor that is gigabytes at a 150k vocabulary."""
    return "logits_to_keep" in _forward_parameters(type(model))


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    # per class: read on every step of the build and of the probe's sampling
    return frozenset(inspect.signature(cls.forward).parameters)


def _rejoin(prefix: torch.Tensor, suffix: torch.Tensor, b: int) -> torch.Tensor:
    """Rows of the prefix (b*c, X) and of the rest (b*(T-c), X) back into one (b*T, X) in token order."""
    return torch.cat([prefix.view(b, -1, prefix.shape[-1]), suffix.view(b, -1, suffix.shape[-1])], 1).flatten(0, 1)


@dataclass
class StepResult:
    keys: dict[int, torch.Tensor]  # layer -> (b*T, d) router inputs under stock routing
    values: dict[int, torch.Tensor]  # layer -> (b*T, E) fp32 z*
    losses: list[float]  # the batch's loss before each step
    answer_logprob: torch.Tensor  # (b,) stock log p(answer), summed over the answer tokens
    answer_greedy: torch.Tensor  # (b,) bool: every answer token is the stock model's argmax


def optimise_logits(model: torch.nn.Module, sites: Sequence[RouterSite], inputs: torch.Tensor, targets: torch.Tensor,
                    scored: torch.Tensor, answer: torch.Tensor, *, eta: float, steps: int = 1, loss: str = "sum",
                    grad: str = "paper", optimizer: str = "sgd", free: str = "all", keys: str = "stock") -> StepResult:
    """T steps on the router logits of one batch (see the module docstring).

    inputs, targets: (b, T) token ids; scored: (b, T) bool, the positions whose next-token NLL is the loss;
    answer: (b, T) bool, the request's continuation (for the loglikelihood lm-eval gets back), a subset of scored.
    free=kept: only the scored positions' logits move; keys=mixed: keys re-read under the optimised routing.
    """
    b = inputs.shape[0]
    start = shared_prefix(scored) if free == "kept" else 0
    past = prefix_keys = prefix_logits = None
    if start > 0:
        past, prefix_keys, prefix_logits = _prefix_cache(model, sites, inputs[:, :start])
        inputs, targets, scored, answer = (x[:, start:] for x in (inputs, targets, scored, answer))
    movable = scored.reshape(-1, 1).float() if free == "kept" else None  # (b*T, 1)
    transform = LeafLogits(dense=grad == "dense", rows=scored.reshape(-1) if free == "kept" else None)
    leaves, opt, losses = None, None, []
    answer_logprob = answer_greedy = None
    for step in range(steps):
        with torch.enable_grad(), hooked_routers(sites, transform), _dense_experts(sites, transform):
            logp, greedy, cols = target_logprobs(model, inputs, targets, scored,
                                                 None if past is None else copy.deepcopy(past))  # (b, P)
            mask = scored[:, cols]
            nll = -(logp * mask).sum(-1)  # (b,)
            if loss == "mean":
                nll = nll / mask.sum(-1)
            total = nll.sum()
            if step == 0:
                ans = answer[:, cols]
                answer_logprob = (logp * ans).sum(-1).detach()
                answer_greedy = (greedy | ~ans).all(-1)
                leaves = [transform.leaves[s.layer] for s in sites]
                if optimizer == "adam":
                    opt = torch.optim.Adam(leaves, lr=eta)
            losses.append(float(total.detach()))
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
        with torch.no_grad():
            for leaf, g in zip(leaves, grads):
                if g is None:
                    continue  # a layer that cannot influence the loss
                if movable is not None:
                    g = g * movable
                if opt is None:
                    leaf -= eta * g
                else:
                    leaf.grad = g
            if opt is not None:
                opt.step()
    stored_keys = {s.layer: transform.keys[s.layer] for s in sites}
    if keys == "mixed":
        stored_keys = _keys_under(model, sites, inputs, transform, scored.reshape(-1), past)
    values = {s.layer: transform.z_star(s.layer) for s in sites}
    if start > 0:  # the prefix's rows: stock keys and logits, as the steps never moved them
        stored_keys = {l: _rejoin(prefix_keys[l], k, b) for l, k in stored_keys.items()}
        values = {l: _rejoin(prefix_logits[l], v, b) for l, v in values.items()}
    return StepResult(
        keys=stored_keys,
        values=values,
        losses=losses, answer_logprob=answer_logprob, answer_greedy=answer_greedy,
    )
