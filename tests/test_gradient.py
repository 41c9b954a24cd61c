"""The build's gradient step against the paper's Eq. 2, computed independently of our hooks and gating code.

The reference replaces every OLMoE router by transformers' own `OlmoeTopKRouter` whose weight is the identity and
whose input is a free leaf z_l: transformers' gating then runs on z_l exactly (z @ I == z), and autograd gives the
paper's d NLL / d z_l with no gradient through any W h.
"""

import copy
import types

import pytest
import torch

from knnmoe_eval.core.gradient import LeafLogits, optimise_logits
from knnmoe_eval.core.hooks import hooked_routers
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.testing import make_tiny_model, router_logits

LAYERS = 4


@pytest.fixture(scope="module")
def trained():
    """A 4-layer tiny OLMoE trained a little on a next-token rule, so that its routing and gradients are not noise."""
    torch.manual_seed(0)
    model = make_tiny_model("olmoe", num_hidden_layers=LAYERS).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        x = torch.randint(4, 40, (16, 12), generator=gen)
        y = (x * 7 + 3) % 36 + 4  # each token predicts a fixed function of itself
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def batch(n_answer: int, seed: int = 2):
    """Two sequences of different lengths, right-padded, each with an n_answer-token answer at its end."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (10, 8)
    inputs = torch.zeros(2, 10, dtype=torch.long)
    targets = torch.zeros(2, 10, dtype=torch.long)
    answer = torch.zeros(2, 10, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids = torch.randint(4, 40, (n + 1,), generator=gen)
        inputs[i, :n], targets[i, :n] = ids[:-1], ids[1:]
        answer[i, n - n_answer : n] = True
    return inputs, targets, answer


def reference_steps(model, inputs, targets, scored, eta, steps):
    """The paper's T steps, independently: identity routers fed with leaves, full-vocabulary log-softmax."""
    ref = copy.deepcopy(model)
    stock = router_logits(ref, inputs)
    leaves = {layer: z.clone().requires_grad_() for layer, z in stock.items()}
    for layer, z in leaves.items():
        mlp = ref.model.layers[layer].mlp
        router = copy.deepcopy(mlp.gate)
        router.weight = torch.nn.Parameter(torch.eye(z.shape[1]), requires_grad=False)
        router.hidden_dim = z.shape[1]
        router.register_forward_pre_hook(lambda mod, args, z=z: (z,))
        mlp.gate = router
    for _ in range(steps):
        with torch.enable_grad():
            logp = torch.log_softmax(ref(inputs).logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            loss = -(logp * scored).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()))
        with torch.no_grad():
            for z, g in zip(leaves.values(), grads):
                z -= eta * g
    return stock, {layer: z.detach() for layer, z in leaves.items()}


def relative_error(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("steps, n_answer, every_position", [(1, 1, False), (3, 1, False), (1, 3, False),
                                                               (3, 3, False), (1, 1, True), (3, 1, True)])
def test_stored_step_is_the_papers_step(trained, steps, n_answer, every_position):
    """The answer positions (positions=answer) or every position after the first, each scored on its own next
    token (positions=all: the paper's every time step t with its own target y_t)."""
    inputs, targets, answer = batch(n_answer)
    scored = answer
    if every_position:
        scored = (inputs != 0) & (torch.arange(inputs.shape[1]) >= 1)
    eta = 2.0
    result = optimise_logits(trained, find_routers(trained), inputs, targets, scored, answer, eta=eta, steps=steps)
    stock, ref = reference_steps(trained, inputs, targets, scored, eta, steps)
    for layer in range(LAYERS):
        ours_step = result.values[layer] - stock[layer]
        ref_step = ref[layer] - stock[layer]
        assert ref_step.norm() > 1e-3  # the check is not vacuous: every layer moves
        assert relative_error(ours_step, ref_step) <= 1e-4, layer


def test_mean_loss_divides_each_sequence_by_its_answer_length(trained):
    inputs, targets, answer = batch(3)
    sites = find_routers(trained)
    # a large eta keeps the step far above the fp32 rounding of z* - z (|z| ~ 5, 2^-24 relative)
    summed = optimise_logits(trained, sites, inputs, targets, answer, answer, eta=100.0)
    mean = optimise_logits(trained, sites, inputs, targets, answer, answer, eta=300.0, loss="mean")
    stock, _ = reference_steps(trained, inputs, targets, answer, 1.0, 0)
    for layer in range(LAYERS):
        assert relative_error(mean.values[layer] - stock[layer], summed.values[layer] - stock[layer]) <= 1e-5


def test_sequences_in_a_batch_never_mix(trained):
    """A sequence's stored step is the same alone as beside another (its padding rows are never scored)."""
    inputs, targets, answer = batch(2)
    sites = find_routers(trained)
    both = optimise_logits(trained, sites, inputs, targets, answer, answer, eta=1.0)
    n = int((inputs[1] != 0).sum())
    alone = optimise_logits(trained, sites, inputs[1:, :n], targets[1:, :n], answer[1:, :n], answer[1:, :n], eta=1.0)
    width = inputs.shape[1]
    for layer in range(LAYERS):
        assert torch.allclose(both.values[layer][width : width + n], alone.values[layer], rtol=1e-5, atol=1e-6)


def rms_norm_float64(norm, h):
    return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def test_gradient_matches_finite_differences_in_float64():
    """d loss / d z_l against central differences of the loss in float64, where truncation and rounding are
    both far below the tolerance (eps 1e-5: error ~ eps^2 |f'\'\'| + 1e-16 / eps). Every op must then run in
    float64: GPT-OSS gates (and its eager attention normalises) in the logits' dtype, where the softmax-first
    families gate in fp32; transformers' RMSNorm upcasts to fp32, a downcast here, so the norms are restated."""
    model = make_tiny_model("gpt_oss", num_hidden_layers=3)
    model.set_experts_implementation("eager")  # the default grouped_mm has no float64 kernel
    model.double()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm_float64, module)
    inputs, targets, answer = batch(1)
    sites = find_routers(model)
    transform = LeafLogits()
    with torch.enable_grad(), hooked_routers(sites, transform):
        logp = torch.log_softmax(model(inputs).logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = -(logp * answer).sum()
        grads = torch.autograd.grad(loss, [transform.leaves[s.layer] for s in sites])

    def loss_at(layer, row, e, bump):
        def shift(site, h, z):
            z = transform.stock[site.layer].double().clone()
            if site.layer == layer:
                z[row, e] += bump
            return z

        with torch.no_grad(), hooked_routers(sites, shift):
            lp = torch.log_softmax(model(inputs).logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return -(lp * answer).sum().item()

    eps, checked = 1e-5, 0
    rows = answer.reshape(-1).nonzero().squeeze(-1).tolist()
    for site, g in zip(sites, grads):
        for row in rows:
            for e in range(g.shape[1]):
                bumped = transform.stock[site.layer][row : row + 1].double().repeat(2, 1)
                bumped[0, e] += eps
                bumped[1, e] -= eps
                chosen = site.gate(bumped)[1].sort(-1).values
                if not torch.equal(chosen[0], chosen[1]):
                    continue  # the top-k set flips inside +-eps: not differentiable there
                fd = (loss_at(site.layer, row, e, eps) - loss_at(site.layer, row, e, -eps)) / (2 * eps)
                assert g[row, e].item() == pytest.approx(fd, rel=1e-4, abs=1e-9)
                checked += 1
    assert checked >= 40 and max(g.abs().max() for g in grads) > 1e-3


ONE_SIGN = {"olmoe", "qwen2_moe", "jamba", "deepseek_v2", "longcat_flash"}  # softmax over all, top-k, no renorm


def gather_only(family, site) -> bool:
    """Whether the paper's gradient is zero on every unselected expert's logit: the weights are renormalised over the
    selected experts, or gathered from per-expert scores (sigmoid). Softmax over all experts without renormalisation
    (ONE_SIGN), sparsemixer's masks and an un-normalised DBRX block reach the unselected ones."""
    if family in ONE_SIGN or family == "phimoe":
        return False
    if family == "dbrx":
        return site.block.moe_normalize_expert_weights is not None
    return bool(getattr(site.module, "norm_topk_prob", True))


def test_paper_gradient_never_names_an_unselected_expert_and_dense_does(family):
    model = make_tiny_model(family)
    for p in model.parameters():
        p.requires_grad_(False)
    inputs, targets, answer = batch(3)
    sites = find_routers(model)
    stock = router_logits(model, inputs)
    paper = optimise_logits(model, sites, inputs, targets, answer, answer, eta=1.0)
    dense = optimise_logits(model, sites, inputs, targets, answer, answer, eta=1.0, grad="dense")
    rows = answer.reshape(-1)
    for site in sites:
        _, selected = site.gate(stock[site.layer])
        g = stock[site.layer] - paper.values[site.layer]  # eta = 1: the gradient itself
        unselected = torch.ones_like(g, dtype=torch.bool).scatter(1, selected, False)
        g_un = g[unselected].view(g.shape[0], -1)  # (n_tokens, E - k)
        if gather_only(family, site):  # zero analytically; float cancellation leaves ~1e-13
            assert g_un.abs().max() <= 1e-6 * g.abs().max()
        elif family in ONE_SIGN:  # softmax -> top-k without renorm: -p_j * sum_i p_i g_i, one sign per token
            assert torch.all((g_un >= 0).all(-1) | (g_un <= 0).all(-1))
        d = stock[site.layer] - dense.values[site.layer]
        d_un = d[unselected].view(g.shape[0], -1)
        assert d_un[rows].abs().max() > 0
        assert not torch.equal(d, g)


def test_dense_gradient_keeps_the_forward_exactly_sparse(family):
    model = make_tiny_model(family)
    inputs, targets, answer = batch(3)
    sites = find_routers(model)
    paper = optimise_logits(model, sites, inputs, targets, answer, answer, eta=1.0)
    dense = optimise_logits(model, sites, inputs, targets, answer, answer, eta=1.0, grad="dense")
    assert paper.losses == dense.losses and torch.equal(paper.answer_logprob, dense.answer_logprob)
