"""The card beside every manifest: Hub metadata huggingface_hub parses, derived from the manifest (sizes and N
exact), never needed to load, and the same bytes after a build resumed at any point."""

import json

import pytest
import torch
from test_build import builder

from knnmoe_eval import KnnMoeError, attach, load_memory
from knnmoe_eval.core import memory as memory_module
from knnmoe_eval.core.card import CARD, render_card
from knnmoe_eval.core.memory import MANIFEST, MANIFEST_SHA256, manifest_digest
from knnmoe_eval.testing import random_references


def card_data(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def test_a_built_memory_carries_a_card_the_hub_parses(tmp_path, model):
    b = builder(model, tmp_path, eta=3.0)
    b.run(random_references(6), pad_id=0, batch_size=3)
    b.finalize()
    out = tmp_path / "mem"
    manifest = json.loads((out / MANIFEST).read_text())
    text = (out / CARD).read_text()
    assert text == render_card(manifest)
    data = card_data(text)
    assert data["library_name"] == "knnmoe-eval" and "olmoe" in data["tags"]
    assert "base_model" not in data  # built from a local path, which is no Hub model id
    knn = data["knnmoe"]
    assert knn["build_tasks"] == ["t"] and knn["reference_requests"] == 6 and knn["preset"] == "paper"
    assert knn["build"]["eta"] == 3.0 and knn["knnmoe_eval_version"] == manifest["knnmoe_eval_version"]
    for layer, entry in manifest["layers"].items():
        assert knn["layers"][layer]["num_keys"] == entry["num_keys"] > 0
        assert knn["layers"][layer]["bytes"] == (out / entry["file"]).stat().st_size  # derived, and exact
        assert knn["layers"][layer]["mean_nn_sq_dist"] == entry["mean_nn_sq_dist"]
    assert knn["bytes"] == sum((out / e["file"]).stat().st_size for e in manifest["layers"].values())
    assert "lm_eval --model hf-knnmoe" in text and "| 0 | " in text


def test_a_hub_base_model_and_its_revision_reach_the_metadata(mem):
    manifest = json.loads((mem / MANIFEST).read_text())
    manifest["model"] |= {"name_or_path": "allenai/OLMoE-1B-7B-0125-Instruct", "revision": "a" * 40}
    text = render_card(manifest, "org/mem")
    data = card_data(text)
    assert data["base_model"] == "allenai/OLMoE-1B-7B-0125-Instruct" and data["base_model_relation"] == "adapter"
    assert data["knnmoe"]["model"]["revision"] == "a" * 40
    assert "pretrained=allenai/OLMoE-1B-7B-0125-Instruct,memory=org/mem" in text


def test_loading_never_needs_nor_reads_the_card(mem, model, mem_ids):
    with torch.no_grad(), attach(model, mem):
        good = model(mem_ids).logits
    (mem / CARD).write_bytes(b"\xff\xfe not even text")
    with torch.no_grad(), attach(model, mem):
        assert torch.equal(model(mem_ids).logits, good)
    (mem / CARD).unlink()
    load_memory(mem)


def test_the_card_does_not_depend_on_when_or_in_which_key_order_the_manifest_was_written(mem):
    manifest = json.loads((mem / MANIFEST).read_text())
    later = {**manifest, "created": "2030-01-01T00:00:00+00:00"}
    later[MANIFEST_SHA256] = manifest_digest(later)
    reordered = json.loads(json.dumps(later), object_pairs_hook=lambda kv: dict(reversed(kv)))
    assert render_card(reordered) == render_card(manifest) == (mem / CARD).read_text()


def test_a_build_interrupted_between_its_card_and_its_manifest_resumes_to_the_same_bytes(tmp_path, model,
                                                                                          monkeypatch):
    seqs = random_references(6)
    whole = builder(model, tmp_path / "a", shard_tokens=1)
    whole.run(seqs, pad_id=0, batch_size=2)
    whole.finalize()

    real = memory_module.write_json_atomic

    def die_at_the_manifest(path, obj):
        if path.name == MANIFEST:
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(memory_module, "write_json_atomic", die_at_the_manifest)
    cut = builder(model, tmp_path / "b", shard_tokens=1)
    cut.run(seqs, pad_id=0, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        cut.finalize()
    assert (tmp_path / "b" / "mem" / CARD).exists()
    with pytest.raises(KnnMoeError, match="incomplete"):
        load_memory(tmp_path / "b" / "mem")
    monkeypatch.setattr(memory_module, "write_json_atomic", real)
    again = builder(model, tmp_path / "b", shard_tokens=1)
    again.run(seqs, pad_id=0, batch_size=2)
    again.finalize()
    a, b = tmp_path / "a" / "mem", tmp_path / "b" / "mem"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for name in (CARD, "layer_000.safetensors", "layer_001.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
