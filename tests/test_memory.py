"""The memory format round-trips, and every bad memory or option is refused with a message naming the fix."""

import json

import pytest
import torch
from safetensors.torch import save_file

from knnmoe_eval import KnnMoeError, attach, load_memory
from knnmoe_eval.core import index as knn_index
from knnmoe_eval.core.files import sha256_file
from knnmoe_eval.core.memory import MANIFEST_SHA256, manifest_digest, write_memory
from knnmoe_eval.core.options import KnnMoeOptions, split_model_args
from knnmoe_eval.testing import make_tiny_model, router_inputs, signature, write_constant_memory


def test_round_trip_keeps_fp16_keys_fp32_values_and_sigma_stats(mem, model, mem_ids):
    keys = router_inputs(model, mem_ids)
    m = load_memory(mem)
    for layer, lm in m.layers.items():
        assert lm.keys.dtype == torch.float16 and lm.values.dtype == torch.float32
        assert torch.equal(lm.keys, keys[layer].half())
        assert lm.stats["mean_nn_sq_dist"] > 0
    m.check_matches(signature(model))


def test_missing_directory(tmp_path, model):
    with pytest.raises(KnnMoeError, match="does not exist. Build one"):
        with attach(model, tmp_path / "nope"):
            pass


def test_memory_pointing_at_a_file_says_it_is_a_file(mem, model):
    manifest = mem / "manifest.json"
    with pytest.raises(KnnMoeError, match="is a file, not a memory directory"):
        with attach(model, manifest):
            pass
    for mode in ("eval", "build"):
        with pytest.raises(KnnMoeError, match=r"memory=.*manifest.json.*is a file, not a memory directory"):
            KnnMoeOptions(memory=str(manifest), mode=mode)


def test_unknown_index_names_the_option_and_its_choices(mem, model):
    with pytest.raises(KnnMoeError, match=r"index='garbage' is neither exact, ivfpq, ivfpq_rerank, hnsw nor a faiss "
                                          r"factory string.*could not parse"):
        with attach(model, mem, index="garbage"):
            pass
    # a real factory string that does not fit these keys (d = 32: 5 sub-quantizers do not divide it)
    with pytest.raises(KnnMoeError, match=r"index='PQ5'.*dimension 32.*multiple of the number of subquantizers"):
        with attach(model, mem, index="PQ5"):
            pass


def test_incomplete_memory_without_manifest(mem, model):
    (mem / "manifest.json").unlink()
    with pytest.raises(KnnMoeError, match="incomplete.*resume"):
        load_memory(mem)


def test_memory_of_another_model_is_refused_by_fingerprint(mem):
    other = make_tiny_model("olmoe", seed=1)
    with pytest.raises(KnnMoeError, match="router weights of layers"):
        with attach(other, mem):
            pass


@pytest.mark.parametrize(
    "overrides, field",
    [({"num_hidden_layers": 3}, "moe_layers"), ({"hidden_size": 48, "head_dim": 12}, "hidden_size"),
     ({"num_experts": 4}, "num_experts")],
)
def test_memory_for_another_shape_names_the_mismatch(mem, overrides, field):
    other = make_tiny_model("olmoe", **overrides)
    with pytest.raises(KnnMoeError, match=f"{field} is"):
        with attach(other, mem):
            pass


def test_corrupted_and_truncated_shards_fail_the_checksum(mem):
    f = mem / "layer_000.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(KnnMoeError, match="truncated or corrupted"):
        load_memory(mem)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(KnnMoeError, match="truncated or corrupted"):
        load_memory(mem)


def test_nan_keys_are_refused_at_write_and_at_load(tmp_path, mem, model, mem_ids):
    keys = router_inputs(model, mem_ids)
    keys[0][3, 1] = float("nan")
    with pytest.raises(KnnMoeError, match="NaN"):
        write_memory(tmp_path / "bad", keys, {l: torch.zeros(k.shape[0], 8) for l, k in keys.items()}, signature(model))
    assert not (tmp_path / "bad" / "manifest.json").exists()
    # a file tampered after writing, with a matching checksum, is still refused
    f = mem / "layer_000.safetensors"
    good = load_memory(mem).layers[0]
    bad_keys = good.keys.clone()
    bad_keys[0, 0] = float("nan")
    save_file({"keys": bad_keys, "values": good.values}, str(f))
    manifest = json.loads((mem / "manifest.json").read_text())
    manifest["layers"]["0"]["sha256"] = sha256_file(f)
    manifest[MANIFEST_SHA256] = manifest_digest(manifest)
    (mem / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KnnMoeError, match="NaN"):
        load_memory(mem)


def test_k_larger_than_the_memory(mem, model):
    n = load_memory(mem).layers[0].keys.shape[0]
    with pytest.raises(KnnMoeError, match=f"k={n + 1} but layer 0 .* holds only {n} keys"):
        with attach(model, mem, k=n + 1):
            pass


def test_existing_memory_is_not_overwritten(mem, model, mem_ids):
    with pytest.raises(KnnMoeError, match="already holds a memory"):
        write_constant_memory(mem, model, router_inputs(model, mem_ids), lambda l, n, e: torch.zeros(n, e))


@pytest.mark.parametrize(
    "args, message",
    [({"memory": "m", "k": 0}, "k=0"), ({"memory": "m", "similarity": "l1"}, "similarity"),
     ({"memory": "m", "eta": -1.0}, "eta"), ({"memory": "m", "eta": float("nan")}, "eta"),
     ({"memory": "m", "grad": "magic"}, "grad"), ({}, "needs memory=DIR")],
)
def test_bad_options(args, message):
    with pytest.raises(KnnMoeError, match=message):
        KnnMoeOptions(**args)


def test_misspelled_model_arg_is_refused_not_forwarded():
    with pytest.raises(KnnMoeError, match="did you mean 'similarity'"):
        split_model_args({"memory": "m", "similarty": "rbf"}, passthrough={"pretrained"})
    opts, rest = split_model_args({"memory": "m", "k": "2", "sigma": "auto", "dtype": "float32"}, {"dtype"})
    assert opts.k == 2 and opts.sigma is None and rest == {"dtype": "float32"}


def test_the_invalid_index_message_suggests_a_form_the_lm_eval_cli_accepts(mem, model):
    """Issue 23: it suggested index=IVF64,Flat, which the CLI splits at the comma. The suggested arguments, parsed
    by lm-eval's own --model_args action, give that factory string, and it is a valid index for this memory."""
    import argparse
    import re
    import shlex

    from lm_eval._cli.utils import MergeDictAction

    with pytest.raises(KnnMoeError) as refused:
        with attach(model, mem, index="garbage"):
            pass
    (suggested,) = re.findall(r"(--model_args pretrained=.*)$", str(refused.value))
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_args", nargs="+", action=MergeDictAction)
    args = parser.parse_args(shlex.split(suggested.replace("...", "M")))
    assert args.model_args["index"] == "IVF64,Flat"
    assert knn_index.plan(args.model_args["index"], 64, 10_000).factory == "IVF64,Flat"


@pytest.mark.parametrize(("built", "evaluated"), [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                                  (torch.bfloat16, torch.float16), (torch.float16, torch.float32)])
def test_the_same_weights_in_another_dtype_are_the_same_model(tmp_path, built, evaluated, caplog):
    """Issue 23: an fp32-built memory evaluated with dtype=float16 was refused as 'router weights differ'."""
    import copy

    base = make_tiny_model("olmoe")
    source = copy.deepcopy(base).to(built)
    keys = {l: k.to(torch.float32) for l, k in router_inputs(base, torch.tensor([[5, 6, 7, 8]])).items()}
    mem = write_constant_memory(tmp_path / "m", source, keys, lambda l, n, e: torch.zeros(n, e))
    target = copy.deepcopy(base).to(evaluated)
    if built == torch.float32 and evaluated == torch.float16:  # the case the sha alone refused
        assert signature(source)["router_fingerprints"] != signature(target)["router_fingerprints"]
    with caplog.at_level("INFO", logger="knnmoe_eval"):
        load_memory(mem).check_matches(signature(target))
    other = make_tiny_model("olmoe", seed=3).to(evaluated)
    with pytest.raises(KnnMoeError, match="router weights of layers .* differ from this model's"
                                          + (".*built with router weights in" if built != evaluated else "")):
        load_memory(mem).check_matches(signature(other))
