"""The build step: the joint gradient, its structure per family, steps, resume, and bad input."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import signature
from knnmoe_eval import KnnMoeError, KnnMoeOptions
from knnmoe_eval.build import MemoryBuilder, OffsetTransform, tokenize_request
from knnmoe_eval.families import find_routers
from knnmoe_eval.hooks import hooked_routers
from knnmoe_eval.memory import load_memory, sha256_file
from knnmoe_eval.tiny import make_tiny_model

def sequences(n=6, length=9, n_cont=3, seed=0):
    """The same n reference sequences on every call, whatever ran before (tests must not depend on order)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(4, 250, (length + (i % 3),), generator=gen).tolist()
        out.append(tokenize_request(("t", i, 0), [1] + ids[:-n_cont], ids[-n_cont:], max_length=64))
    return out


def builder(model, tmp_path, **opts):
    options = KnnMoeOptions(memory=str(tmp_path / "mem"), **opts)
    return MemoryBuilder(model, find_routers(model), signature(model), options)


def answer_loss_and_grads(model, seq, grad="paper"):
    """Mean answer NLL of one sequence and d loss / d offsets, through the builder's own transform."""
    sites = find_routers(model)
    b = MemoryBuilder.__new__(MemoryBuilder)
    b.model, b.sites = model, sites
    b.transform = OffsetTransform(dense=grad == "dense")
    ids = torch.tensor([seq.tokens])
    with torch.enable_grad(), hooked_routers(sites, b.transform), b._dense_experts():
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0, -seq.n_cont:]
        loss = -logp.gather(-1, torch.tensor(seq.targets[-seq.n_cont:])[:, None]).mean()
        deltas = [b.transform.deltas[s.layer] for s in sites]
        grads = torch.autograd.grad(loss, deltas, allow_unused=True)
    return loss, dict(zip([s.layer for s in sites], grads)), b.transform


def loss_with_offsets(model, seq, offsets):
    sites = find_routers(model)

    def add(site, h, z):
        return z + offsets[site.layer]

    with torch.no_grad(), hooked_routers(sites, add):
        logp = torch.log_softmax(model(torch.tensor([seq.tokens])).logits.double(), -1)[0, -seq.n_cont:]
    return -logp.gather(-1, torch.tensor(seq.targets[-seq.n_cont:])[:, None]).mean().item()


def test_joint_gradient_matches_finite_differences():
    model = make_tiny_model("olmoe")
    for p in model.parameters():
        p.requires_grad_(False)
    seq = sequences(1)[0]
    _, grads, transform = answer_loss_and_grads(model, seq)
    zeros = {l: torch.zeros_like(d) for l, d in transform.deltas.items()}
    eps = 1e-3
    sites = {s.layer: s for s in find_routers(model)}
    checked = 0
    for layer, g in grads.items():
        z = transform.stock_logits[layer]
        for pos in range(g.shape[0] - seq.n_cont, g.shape[0]):
            for e in range(g.shape[1]):
                bumped = z[pos : pos + 1].repeat(2, 1)
                bumped[0, e] += eps
                bumped[1, e] -= eps
                selections = sites[layer].gate(bumped)[1].sort(-1).values
                if not torch.equal(selections[0], selections[1]):
                    continue  # the top-k set flips inside +-eps: the loss is not differentiable there
                plus = {**zeros, layer: zeros[layer].clone()}
                minus = {**zeros, layer: zeros[layer].clone()}
                plus[layer][pos, e] += eps
                minus[layer][pos, e] -= eps
                fd = (loss_with_offsets(model, seq, plus) - loss_with_offsets(model, seq, minus)) / (2 * eps)
                assert g[pos, e].item() == pytest.approx(fd, rel=0.05, abs=5e-6)
                checked += 1
    assert checked > 0 and max(g.abs().max() for g in grads.values()) > 20 * 5e-6  # the check is not vacuous


ONE_SIGN = {"olmoe", "qwen2_moe", "jamba", "deepseek_v2", "longcat_flash"}  # softmax over all, top-k, no renorm


def test_paper_gradient_never_names_an_unselected_expert_and_dense_does(family):
    model = make_tiny_model(family)
    for p in model.parameters():
        p.requires_grad_(False)
    seq = sequences(1)[0]
    sites = find_routers(model)
    _, grads, transform = answer_loss_and_grads(model, seq, "paper")
    _, dense_grads, _ = answer_loss_and_grads(model, seq, "dense")
    for site in sites:
        g = grads[site.layer]
        _, selected = site.gate(transform.stock_logits[site.layer])
        unselected = torch.ones_like(g, dtype=torch.bool).scatter(1, selected, False)
        g_un = g[unselected].view(g.shape[0], -1)  # (n_tokens, E - k)
        if site.sparse_grad:  # zero analytically; softmax then renormalisation leaves ~1e-13 of float cancellation
            assert g_un.abs().max() <= 1e-6 * g.abs().max()
        elif family in ONE_SIGN:  # softmax -> top-k without renorm: -p_j * sum_i p_i g_i, one sign per token
            assert torch.all((g_un >= 0).all(-1) | (g_un <= 0).all(-1))
        d_un = dense_grads[site.layer][unselected].view(g.shape[0], -1)
        answer_rows = slice(g.shape[0] - seq.n_cont, g.shape[0])
        assert d_un[answer_rows].abs().max() > 0
        assert not torch.equal(dense_grads[site.layer], g)


def test_dense_gradient_keeps_the_forward_exactly_sparse(family):
    model = make_tiny_model(family)
    seq = sequences(1)[0]
    paper_loss, _, _ = answer_loss_and_grads(model, seq, "paper")
    dense_loss, _, _ = answer_loss_and_grads(model, seq, "dense")
    assert torch.equal(paper_loss, dense_loss)


@pytest.mark.parametrize("optimizer, eta", [("sgd", 0.5), ("adam", 0.05)])
def test_more_steps_with_a_small_eta_lower_the_reference_loss(tmp_path, optimizer, eta):
    model = make_tiny_model("olmoe")
    b = builder(model, tmp_path, eta=eta, steps=4, optimizer=optimizer)
    b.run(sequences(), pad_id=0, batch_size=3)
    curve = b.loss_curve
    assert all(later < earlier for earlier, later in zip(curve, curve[1:])), curve


def test_interrupted_build_resumes_to_the_same_memory(tmp_path, monkeypatch):
    model = make_tiny_model("olmoe")
    seqs = sequences(8)
    full = builder(model, tmp_path / "a", shard_tokens=1)
    full.run(seqs, pad_id=0, batch_size=2)
    full.finalize()

    flushes = []
    real_flush = MemoryBuilder._flush

    def flush_then_die(self, shard, seq_no):
        real_flush(self, shard, seq_no)
        flushes.append(seq_no)
        if len(flushes) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(MemoryBuilder, "_flush", flush_then_die)
    with pytest.raises(KeyboardInterrupt):
        builder(model, tmp_path / "b", shard_tokens=1).run(seqs, pad_id=0, batch_size=2)
    monkeypatch.setattr(MemoryBuilder, "_flush", real_flush)
    with pytest.raises(KnnMoeError, match="incomplete"):
        load_memory(tmp_path / "b" / "mem")
    resumed = builder(model, tmp_path / "b", shard_tokens=1)
    resumed.run(seqs, pad_id=0, batch_size=2)
    resumed.finalize()
    for layer in (0, 1):
        a = load_file(str(tmp_path / "a" / "mem" / f"layer_{layer:03d}.safetensors"))
        b = load_file(str(tmp_path / "b" / "mem" / f"layer_{layer:03d}.safetensors"))
        assert torch.equal(a["keys"], b["keys"]) and torch.equal(a["values"], b["values"])


def test_streamed_finalize_writes_what_an_in_ram_merge_would(tmp_path):
    """Many small shards and lm-eval's padding duplicates: the streamed merge is byte for byte the file that
    merging every shard in RAM (first copy of each request, request order) and `save_file` would give."""
    model = make_tiny_model("olmoe")
    seqs = sequences(8)
    seqs += [seqs[-1], seqs[2]]  # a short rank is padded with copies of its requests
    small = builder(model, tmp_path / "a", shard_tokens=1)
    small.run(seqs, pad_id=0, batch_size=3)
    assert len(small._finished_shards()) > 3
    first_copy = {}
    for path in small._finished_shards():
        meta, tensors, offset = small._read_meta(path), load_file(str(path)), 0
        for rid, count in zip(meta["rids"], meta["counts"]):
            first_copy.setdefault(tuple(rid), {k: t[offset : offset + count] for k, t in tensors.items()})
            offset += count
    order = sorted(first_copy)
    small.finalize()
    whole = builder(model, tmp_path / "b", shard_tokens=10**6)
    whole.run(seqs, pad_id=0, batch_size=3)
    whole.finalize()
    manifest = load_memory(tmp_path / "a" / "mem").manifest
    for layer in (0, 1):
        ref = tmp_path / f"ref{layer}.safetensors"
        save_file({part: torch.cat([first_copy[r][f"{part}.{layer}"] for r in order]) for part in ("keys", "values")},
                  str(ref))
        name = f"layer_{layer:03d}.safetensors"
        assert sha256_file(tmp_path / "a" / "mem" / name) == sha256_file(ref) == sha256_file(tmp_path / "b" / "mem" / name)
        assert manifest["layers"][str(layer)]["num_keys"] == sum(first_copy[r]["keys.0"].shape[0] for r in order)
    assert manifest["build"]["requests"] == 8


def test_bad_build_input(tmp_path):
    model = make_tiny_model("olmoe")
    with pytest.raises(KnnMoeError, match="reference split is empty"):
        builder(model, tmp_path).run([], pad_id=0, batch_size=2)
    with pytest.raises(KnnMoeError, match="empty continuation"):
        tokenize_request(("t", 0, 0), [1, 5, 6], [], max_length=16)
    # a partial build of another model in the same directory
    b = builder(model, tmp_path / "x", shard_tokens=1)
    b.run(sequences(2), pad_id=0, batch_size=2)
    with pytest.raises(KnnMoeError, match="partial build for another model"):
        builder(make_tiny_model("olmoe", seed=3), tmp_path / "x")
    with pytest.raises(KnnMoeError, match="partial build with other settings"):
        builder(model, tmp_path / "x", eta=3.0)
    b.finalize()
    with pytest.raises(KnnMoeError, match="already holds a complete memory"):
        builder(model, tmp_path / "x")
