"""The build step: the joint gradient, its structure per family, steps, resume, and bad input."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from knnmoe_eval import KnnMoeError, KnnMoeOptions
from knnmoe_eval.core.build import MemoryBuilder, tokenize_request
from knnmoe_eval.core.files import sha256_file
from knnmoe_eval.core.memory import load_memory
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.testing import make_tiny_model, random_references, signature


def builder(model, tmp_path, **opts):
    options = KnnMoeOptions(memory=str(tmp_path / "mem"), **opts)
    return MemoryBuilder(model, find_routers(model), signature(model), options)


def test_positions_all_stores_every_position_scored_on_its_own_next_token(tmp_path):
    """positions=all keeps every position after the first, and each one's value is the step on the summed NLL of
    every kept position's own target (not of the answer alone)."""
    from knnmoe_eval.core.gradient import optimise_logits

    model = make_tiny_model("olmoe")
    seq = random_references(1)[0]
    b = builder(model, tmp_path, positions="all")
    b.run([seq], pad_id=0, batch_size=1)
    b.finalize()
    memory = load_memory(tmp_path / "mem")
    n = len(seq.tokens)
    inputs, targets = torch.tensor([seq.tokens]), torch.tensor([seq.targets])
    every = torch.arange(n)[None] >= 1
    answer = torch.arange(n)[None] >= n - seq.n_cont
    sites = find_routers(model)
    ref = optimise_logits(model, sites, inputs, targets, every, answer, eta=b.options.eta)
    answer_only = optimise_logits(model, sites, inputs, targets, answer, answer, eta=b.options.eta)
    for site in sites:
        stored = memory.layers[site.layer].values
        assert stored.shape[0] == n - 1
        assert torch.equal(stored, ref.values[site.layer][1:])
        assert not torch.allclose(stored, answer_only.values[site.layer][1:])  # context targets count too


@pytest.mark.parametrize("optimizer, eta", [("sgd", 0.5), ("adam", 0.05)])
def test_more_steps_with_a_small_eta_lower_the_reference_loss(tmp_path, optimizer, eta):
    model = make_tiny_model("olmoe")
    b = builder(model, tmp_path, eta=eta, steps=4, optimizer=optimizer)
    b.run(random_references(), pad_id=0, batch_size=3)
    curve = b.loss_curve
    assert all(later < earlier for earlier, later in zip(curve, curve[1:])), curve


def test_interrupted_build_resumes_to_the_same_memory(tmp_path, monkeypatch):
    model = make_tiny_model("olmoe")
    seqs = random_references(8)
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
    assert (tmp_path / "a" / "mem" / "README.md").read_bytes() == (tmp_path / "b" / "mem" / "README.md").read_bytes()


def test_streamed_finalize_writes_what_an_in_ram_merge_would(tmp_path):
    """Many small shards and lm-eval's padding duplicates: the streamed merge is byte for byte the file that
    merging every shard in RAM (first copy of each request, request order) and `save_file` would give."""
    model = make_tiny_model("olmoe")
    seqs = random_references(8)
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
    b.run(random_references(2), pad_id=0, batch_size=2)
    b.release()  # as a build process that ended (a live one would refuse them all: test_two_builds...)
    with pytest.raises(KnnMoeError, match="partial build for another model"):
        builder(make_tiny_model("olmoe", seed=3), tmp_path / "x")
    with pytest.raises(KnnMoeError, match="partial build with other settings"):
        builder(model, tmp_path / "x", eta=3.0)
    b.finalize()
    with pytest.raises(KnnMoeError, match="already holds a complete memory"):
        builder(model, tmp_path / "x")
    with pytest.raises(KnnMoeError, match="loss='median'.*choose sum or mean"):
        KnnMoeOptions(memory="m", loss="median")


def test_manifest_records_the_build_settings(tmp_path):
    model = make_tiny_model("olmoe")
    b = builder(model, tmp_path, loss="mean", eta=3.0)
    b.run(random_references(2), pad_id=0, batch_size=2)
    b.finalize()
    build = load_memory(tmp_path / "mem").manifest["build"]
    assert {k: build[k] for k in ("eta", "steps", "loss", "grad", "optimizer", "positions")} == dict(
        eta=3.0, steps=1, loss="mean", grad="paper", optimizer="sgd", positions="answer")
